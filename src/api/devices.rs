//! Devices (Ed25519 public keys) and the encrypted backups they sign.
//!
//! keepd checks each backup's signature against the device's public key
//! before storing it: it can tell a backup came from a device of the
//! account, yet never holds a key that opens it.

use std::sync::Arc;
use std::time::Instant;

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
use super::extract::{ApiJson, ApiPath, ApiQuery, CursorPage, UserAuth, page_limit, whole};
use super::store::backups::{self, NewBackup};
use super::store::{devices, usage};
use super::sync::{check_base64, check_text};
use super::{Api, iso8601};
use crate::audit::AuditAction;
use crate::device_messages::{self, SignatureError, SignedBackup};
use crate::postgres::pool::{GroupRole, ScopedTransaction};

const MAX_DEVICE_NAME_CHARS: usize = 200;
const DEFAULT_PAGE: i64 = 20;
const MAX_PAGE: i64 = 100;

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegisterDeviceBody {
    #[schema(min_length = 1, max_length = 200, pattern = r"^[^\u0000]+$")]
    device_name: String,
    /// Base64 of the 32-byte Ed25519 public key.
    #[schema(format = Byte, pattern = r"^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$")]
    public_key: String,
    /// Base64 Ed25519 signature by this key over the registration message
    /// (docs/api.md): the device proves it holds the private key.
    #[schema(format = Byte, pattern = r"^[A-Za-z0-9+/]{85}[AQgw]==$")]
    proof: String,
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
#[serde(rename_all = "camelCase")]
pub struct DevicesResponse {
    devices: Vec<Device>,
    /// Pass as `after` for the next page; null on the last page.
    next_cursor: Option<Uuid>,
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
    #[schema(format = Byte, pattern = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{4}|[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)$")]
    ciphertext: String,
    /// Base64.
    #[schema(format = Byte, pattern = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{4}|[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)$")]
    nonce: String,
    /// Base64 AEAD tag.
    #[schema(format = Byte, pattern = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{4}|[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)$")]
    auth_tag: String,
    /// Base64 Ed25519 signature by the device's key: version 2 over the
    /// backup message of docs/api.md, version 1 (legacy) over the raw
    /// ciphertext bytes.
    #[schema(format = Byte, pattern = r"^[A-Za-z0-9+/]{85}[AQgw]==$")]
    signature: String,
    /// 1 (legacy, the default; refused where
    /// `api.backups.accept_v1_signatures` is false) or 2.
    #[serde(default, deserialize_with = "whole::option_u8")]
    #[schema(minimum = 1, maximum = 2)]
    signature_version: Option<u8>,
    data_classification: DataClassification,
}

/// How a backup's signature was made, as responses and audit entries name it.
fn signature_scheme(version: i16) -> &'static str {
    if version == 2 {
        "v2"
    } else {
        "legacy-ciphertext-only"
    }
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupSummary {
    id: Uuid,
    device_id: Uuid,
    data_classification: DataClassification,
    /// What the backup counts against `api.quotas.storage_bytes`: its
    /// ciphertext, nonce and tag, decoded.
    size_bytes: i64,
    created_at: String,
    /// 1 (legacy: over the ciphertext only) or 2.
    signature_version: i16,
    /// `v2` or `legacy-ciphertext-only`.
    signature_scheme: &'static str,
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
    signature_version: i16,
    signature_scheme: &'static str,
}

#[derive(Serialize, ToSchema)]
pub struct BackupResponse {
    backup: Backup,
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DevicesPage {
    /// 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<i64>,
    /// The `nextCursor` of the previous page.
    after: Option<Uuid>,
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct BackupsPage {
    /// 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<i64>,
    /// The `nextCursor` of the previous page.
    before: Option<Uuid>,
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub struct IdPath {
    id: Uuid,
}

impl From<devices::Device> for Device {
    fn from(device: devices::Device) -> Device {
        Device {
            id: device.id,
            device_name: device.name,
            public_key: BASE64.encode(device.public_key),
            created_at: iso8601(device.created_at),
            revoked_at: device.revoked_at.map(iso8601),
        }
    }
}

/// Registers a device's Ed25519 public key.
#[utoipa::path(post, path = "/devices", tag = "devices",
    request_body = RegisterDeviceBody,
    responses(
        (status = 201, body = DeviceResponse),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 409, description = "The key is registered already", body = ErrorBody),
        (status = 413, description = "api.quotas.devices reached", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(super) async fn register_device(
    State(api): State<Arc<Api>>,
    auth: UserAuth,
    ApiJson(body): ApiJson<RegisterDeviceBody>,
) -> Result<(StatusCode, Json<DeviceResponse>), ApiError> {
    let started = Instant::now();
    check_text(
        "invalid_device_name",
        "deviceName",
        &body.device_name,
        MAX_DEVICE_NAME_CHARS,
    )?;
    let key = check_base64("publicKey", &body.public_key)?;
    let parsed = <[u8; 32]>::try_from(key.as_slice())
        .ok()
        .and_then(|bytes| VerifyingKey::from_bytes(&bytes).ok());
    let Some(parsed) = parsed else {
        return Err(ApiError::bad_request(
            "invalid_public_key",
            "`publicKey` must be the base64 of a 32-byte Ed25519 public key",
        ));
    };
    // A small-order point (the identity among them) verifies signatures
    // nobody made with a private key.
    if parsed.is_weak() {
        return Err(ApiError::bad_request(
            "weak_public_key",
            "`publicKey` is a weak (small-order) Ed25519 point; generate a real key pair",
        ));
    }
    let proof = check_base64("proof", &body.proof)?;
    let proven = Signature::from_slice(&proof).is_ok_and(|proof| {
        let message = device_messages::registration(auth.user, parsed.as_bytes());
        parsed.verify_strict(&message, &proof).is_ok()
    });
    if !proven {
        return Err(ApiError::bad_request(
            "bad_proof",
            "`proof` must be this key's Ed25519 signature over the registration message \
             naming this account and key (docs/api.md)",
        ));
    }
    let mut tx = auth.begin(&api, GroupRole::Sync).await?;
    let Some((id, created_at)) =
        devices::add(&tx, &api.fields, auth.user, &body.device_name, &key).await?
    else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "device_key_registered",
            "this public key is registered already; generate a new key pair for this device",
        ));
    };
    device_quota(&api, &tx, auth.user).await?;
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

/// 413 `quota_exceeded` when the device just added takes the account past
/// `api.quotas.devices`. Revoked devices count until the janitor purges
/// them, so registering and revoking cannot grow the table without bound;
/// the message says how many are revoked and when they go.
async fn device_quota(api: &Api, tx: &ScopedTransaction, user: Uuid) -> Result<(), ApiError> {
    let quotas = &api.settings.quotas;
    let usage = usage::of(tx, user).await?;
    let Some(exceeded) = usage.exceeds(&usage::Usage::from(quotas)) else {
        return Ok(());
    };
    let revoked = devices::revoked(tx, user).await?;
    Err(ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "quota_exceeded",
        format!(
            "this would bring the account to {} where {} allows {}, {revoked} of them revoked: \
             a revoked device counts until it is purged, api.quotas.revoked_device_retention \
             ({}) after its revocation (one whose backups are still stored is kept with them); \
             nothing was stored (GET /account shows usage and quotas)",
            exceeded.would_be, exceeded.quota, exceeded.limit, quotas.revoked_device_retention
        ),
    ))
}

/// The account's devices, revoked ones included, oldest first, a page at
/// a time.
#[utoipa::path(get, path = "/devices", tag = "devices",
    params(DevicesPage),
    responses(
        (status = 200, body = DevicesResponse),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(super) async fn list_devices(
    State(api): State<Arc<Api>>,
    auth: UserAuth,
    ApiQuery(page): ApiQuery<DevicesPage>,
) -> Result<Json<DevicesResponse>, ApiError> {
    let limit = page_limit(page.limit, DEFAULT_PAGE, MAX_PAGE)?;
    let tx = auth.begin(&api, GroupRole::Query).await?;
    // One more than asked tells whether there is another page.
    let found = devices::list(&tx, &api.fields, auth.user, page.after, limit + 1).await?;
    tx.commit().await?;
    let devices: Vec<Device> = found.into_iter().map(Device::from).collect();
    let CursorPage {
        items: devices,
        next: next_cursor,
    } = CursorPage::of(devices, limit, |d| d.id);
    Ok(Json(DevicesResponse {
        devices,
        next_cursor,
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
    if !devices::revoke(&tx, auth.user, id).await? {
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
        (status = 400, description = "Malformed input, a signature that does not verify, or signature version 1 where api.backups.accept_v1_signatures is false", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "Not a device of this account, or revoked", body = ErrorBody),
        (status = 409, description = "The account holds this same backup", body = ErrorBody),
        (status = 413, description = "api.quotas.backups or storage_bytes reached", body = ErrorBody),
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
    let version = match body.signature_version.unwrap_or(1) {
        1 => 1i16,
        2 => 2,
        other => {
            return Err(ApiError::bad_request(
                "invalid_signature_version",
                format!("`signatureVersion` {other} is unknown: use 2 (or 1, legacy)"),
            ));
        }
    };
    if version == 1 && !api.settings.backups.accept_v1_signatures {
        return Err(ApiError::bad_request(
            "legacy_signature_refused",
            "signature version 1 (over the ciphertext alone; also what an absent \
             `signatureVersion` means) is refused on this server \
             (api.backups.accept_v1_signatures is false): sign the version 2 backup message \
             (docs/api.md) and send `signatureVersion: 2`",
        ));
    }
    let classification = body.data_classification.as_str();
    let mut tx = auth.begin(&api, GroupRole::Sync).await?;
    let Some(device) = devices::key(&tx, auth.user, body.device_id).await? else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "unknown_device",
            "`deviceId` is not a device of this account; register it with POST /devices",
        ));
    };
    if device.revoked {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "device_revoked",
            "this device was revoked; its backups are no longer accepted",
        ));
    }
    let signed = SignedBackup {
        device: body.device_id,
        classification,
        nonce: &nonce,
        auth_tag: &auth_tag,
        ciphertext: &ciphertext,
    };
    match device_messages::verify_backup(&device.public_key, version, &signed, &signature) {
        Ok(()) => {}
        Err(SignatureError::StoredKey) => {
            return Err(ApiError::internal(
                "device key",
                &"stored key is not Ed25519",
            ));
        }
        Err(SignatureError::Mismatch) => {
            return Err(ApiError::bad_request(
                "bad_signature",
                format!(
                    "`signature` does not verify with this device's key over {}",
                    if version == 2 {
                        "the version 2 backup message (docs/api.md)"
                    } else {
                        "the ciphertext (signature version 1)"
                    }
                ),
            ));
        }
    }
    let backup = NewBackup {
        device: body.device_id,
        ciphertext,
        nonce,
        auth_tag,
        signature: signature_bytes,
        signature_version: version,
        classification,
    };
    let Some((id, size, created_at)) = backups::store(&tx, &api.fields, auth.user, backup).await?
    else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "backup_exists",
            "this account already holds this same backup (ciphertext, nonce and tag)",
        ));
    };
    api.check_quotas(&tx, auth.user).await?;
    let metadata = json!({
        "user": api.user_ref(auth.user),
        "device": body.device_id,
        "backup": id,
        "sizeBytes": size,
        "dataClassification": classification,
        "signatureScheme": signature_scheme(version),
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
                signature_version: version,
                signature_scheme: signature_scheme(version),
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
    let limit = page_limit(page.limit, DEFAULT_PAGE, MAX_PAGE)?;
    let tx = auth.begin(&api, GroupRole::Query).await?;
    // One more than asked tells whether there is another page.
    let found = backups::page(&tx, auth.user, page.before, limit + 1).await?;
    tx.commit().await?;
    let backups: Vec<BackupSummary> = found
        .into_iter()
        .map(|b| BackupSummary {
            id: b.id,
            device_id: b.device,
            data_classification: DataClassification::parse(&b.classification),
            size_bytes: b.size_bytes,
            created_at: iso8601(b.created_at),
            signature_version: b.signature_version,
            signature_scheme: signature_scheme(b.signature_version),
        })
        .collect();
    let CursorPage {
        items: backups,
        next: next_cursor,
    } = CursorPage::of(backups, limit, |b| b.id);
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
    let found = backups::get(&tx, &api.fields, auth.user, id).await?;
    tx.commit().await?;
    let b = found.ok_or_else(|| {
        ApiError::not_found("backup_not_found", "no backup with this id on this account")
    })?;
    Ok(Json(BackupResponse {
        backup: Backup {
            id,
            device_id: b.device,
            ciphertext: BASE64.encode(b.ciphertext),
            nonce: BASE64.encode(b.nonce),
            auth_tag: BASE64.encode(b.auth_tag),
            signature: BASE64.encode(b.signature),
            data_classification: DataClassification::parse(&b.classification),
            size_bytes: b.size_bytes,
            created_at: iso8601(b.created_at),
            signature_version: b.signature_version,
            signature_scheme: signature_scheme(b.signature_version),
        },
    }))
}

/// Deletes one of the account's backups, freeing its place in the quotas.
#[utoipa::path(delete, path = "/backups/{id}", tag = "backups",
    params(IdPath),
    responses(
        (status = 200, body = super::auth::MessageBody),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, description = "No backup with this id on this account", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(super) async fn delete_backup(
    State(api): State<Arc<Api>>,
    auth: UserAuth,
    ApiPath(IdPath { id }): ApiPath<IdPath>,
) -> Result<Json<super::auth::MessageBody>, ApiError> {
    let started = Instant::now();
    let mut tx = auth.begin(&api, GroupRole::Sync).await?;
    let Some(bytes) = backups::delete(&tx, auth.user, id).await? else {
        return Err(ApiError::not_found(
            "backup_not_found",
            "no backup with this id on this account",
        ));
    };
    let metadata = json!({"user": api.user_ref(auth.user), "backup": id, "bytes": bytes});
    api.audit(&mut tx, AuditAction::BackupDelete, 1, started, metadata)
        .await?;
    tx.commit().await?;
    Ok(Json(super::auth::MessageBody::new("Backup deleted")))
}
