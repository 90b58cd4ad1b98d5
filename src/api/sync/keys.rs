//! A vault's wrapped key: stored (which creates the vault), read, and
//! re-wrapped under a new password guarded by its version.

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use uuid::Uuid;

use super::vaults::VaultIdPath;
use super::*;
use crate::api::error::{ApiError, ErrorBody};
use crate::api::extract::{ApiJson, ApiPath, UserAuth, whole};
use crate::api::store::vaults::{self, KeyCheckChange, WrappedKey};
use crate::api::{Api, iso8601};
use crate::audit::AuditAction;
use crate::postgres::pool::GroupRole;

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StoreVaultKeyBody {
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$"
    )]
    vault_id: String,
    /// Base64: the vault key encrypted client-side.
    #[schema(format = Byte, pattern = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{4}|[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)$")]
    encrypted_vault_key: String,
    /// Base64.
    #[schema(format = Byte, pattern = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{4}|[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)$")]
    salt: String,
    /// Base64.
    #[schema(format = Byte, pattern = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{4}|[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)$")]
    nonce: String,
    /// Optional: base64 of a value the client derives from the vault key
    /// (keepd's client: HMAC-SHA256 of the key over `keepd vault key check
    /// v1`), which reveals nothing of it; a push carrying another one is
    /// refused with 409 `wrong_vault_key`.
    #[schema(format = Byte, max_length = 200, pattern = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{4}|[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)$")]
    key_check: Option<String>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StoredVaultKey {
    id: Uuid,
    vault_id: String,
    created_at: String,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StoreVaultKeyResponse {
    message: &'static str,
    vault_key: StoredVaultKey,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct VaultKey {
    vault_id: String,
    encrypted_vault_key: String,
    salt: String,
    nonce: String,
    created_at: String,
    /// Starts at 1 and grows with each re-wrap; `PATCH` names the version
    /// it replaces.
    version: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_check: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    updated_at: Option<String>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct VaultKeyResponse {
    vault_key: VaultKey,
}

/// Stores a vault's encrypted key; creates the vault.
#[utoipa::path(post, path = "/sync/vault-key", tag = "sync",
    request_body = StoreVaultKeyBody,
    responses(
        (status = 201, body = StoreVaultKeyResponse),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 409, description = "The vault already has a key", body = ErrorBody),
        (status = 413, description = "api.quotas.vaults reached", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(in crate::api) async fn store_vault_key(
    State(api): State<Arc<Api>>,
    auth: UserAuth,
    ApiJson(body): ApiJson<StoreVaultKeyBody>,
) -> Result<(StatusCode, Json<StoreVaultKeyResponse>), ApiError> {
    let started = Instant::now();
    check_vault_id(&body.vault_id)?;
    check_base64("encryptedVaultKey", &body.encrypted_vault_key)?;
    check_base64("salt", &body.salt)?;
    check_base64("nonce", &body.nonce)?;
    check_key_check(body.key_check.as_deref())?;
    let mut tx = auth.begin(&api, GroupRole::Sync).await?;
    let Some(vault) = vaults::create(&tx, auth.user, &body.vault_id).await? else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "vault_key_exists",
            "this vault already has a key; fetch it with GET /sync/vault-key/{vaultId}",
        ));
    };
    let key = WrappedKey {
        encrypted_vault_key: body.encrypted_vault_key,
        salt: body.salt,
        nonce: body.nonce,
    };
    let (key_id, created_at) = vaults::store_key(
        &tx,
        &api.fields,
        vault,
        auth.user,
        key,
        body.key_check.as_deref(),
    )
    .await?;
    api.check_quotas(&tx, auth.user).await?;
    let metadata = json!({"user": api.user_ref(auth.user), "vault": vault});
    api.audit(&mut tx, AuditAction::VaultKeyStore, 1, started, metadata)
        .await?;
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(StoreVaultKeyResponse {
            message: "Vault key stored successfully",
            vault_key: StoredVaultKey {
                id: key_id,
                vault_id: body.vault_id,
                created_at: iso8601(created_at),
            },
        }),
    ))
}

/// A vault's encrypted key.
#[utoipa::path(get, path = "/sync/vault-key/{vaultId}", tag = "sync",
    params(VaultIdPath),
    responses(
        (status = 200, body = VaultKeyResponse),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(in crate::api) async fn vault_key(
    State(api): State<Arc<Api>>,
    auth: UserAuth,
    ApiPath(vault_id): ApiPath<String>,
) -> Result<Json<VaultKeyResponse>, ApiError> {
    check_vault_id(&vault_id)?;
    let tx = auth.begin(&api, GroupRole::Query).await?;
    let stored = vaults::key(&tx, &api.fields, auth.user, &vault_id).await?;
    tx.commit().await?;
    let stored = stored.ok_or_else(vault_not_found)?;
    Ok(Json(VaultKeyResponse {
        vault_key: VaultKey {
            vault_id,
            encrypted_vault_key: stored.key.encrypted_vault_key,
            salt: stored.key.salt,
            nonce: stored.key.nonce,
            created_at: iso8601(stored.created_at),
            version: stored.version,
            key_check: stored.key_check,
            updated_at: stored.updated_at.map(iso8601),
        },
    }))
}

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RewrapVaultKeyBody {
    /// Base64: the same vault key, encrypted under the new password.
    #[schema(format = Byte, pattern = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{4}|[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)$")]
    encrypted_vault_key: String,
    /// Base64.
    #[schema(format = Byte, pattern = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{4}|[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)$")]
    salt: String,
    /// Base64.
    #[schema(format = Byte, pattern = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{4}|[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)$")]
    nonce: String,
    /// The version this replaces, as `GET /sync/vault-key/{vaultId}`
    /// answered it: another device's re-wrap in between is a 409, never
    /// overwritten.
    #[serde(deserialize_with = "whole::i32")]
    #[schema(minimum = 1)]
    version: i32,
    /// Optional: a key check for a record that had none. An existing one
    /// stays unless `replaceKeyCheck` is true.
    #[schema(format = Byte, max_length = 200, pattern = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{4}|[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)$")]
    key_check: Option<String>,
    /// True: `keyCheck` replaces the record's key check (without one, the
    /// record then has none). False or absent: an existing key check is
    /// kept.
    #[serde(default)]
    replace_key_check: bool,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RewrapVaultKeyResponse {
    message: &'static str,
    vault_id: String,
    version: i32,
    updated_at: String,
}

/// Replaces a vault's wrapped key (the same key re-wrapped, after a
/// password change), if it is still at the version the client read.
#[utoipa::path(patch, path = "/sync/vault-key/{vaultId}", tag = "sync",
    params(VaultIdPath),
    request_body = RewrapVaultKeyBody,
    responses(
        (status = 200, body = RewrapVaultKeyResponse),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "The record is at another version: read it again", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(in crate::api) async fn rewrap_vault_key(
    State(api): State<Arc<Api>>,
    auth: UserAuth,
    ApiPath(vault_id): ApiPath<String>,
    ApiJson(body): ApiJson<RewrapVaultKeyBody>,
) -> Result<Json<RewrapVaultKeyResponse>, ApiError> {
    let started = Instant::now();
    check_vault_id(&vault_id)?;
    check_base64("encryptedVaultKey", &body.encrypted_vault_key)?;
    check_base64("salt", &body.salt)?;
    check_base64("nonce", &body.nonce)?;
    check_key_check(body.key_check.as_deref())?;
    if body.version < 1 {
        return Err(ApiError::bad_request(
            "invalid_version",
            "`version` must be the record's version, 1 or more",
        ));
    }
    let key = WrappedKey {
        encrypted_vault_key: body.encrypted_vault_key,
        salt: body.salt,
        nonce: body.nonce,
    };
    let key_check = match (body.key_check.as_deref(), body.replace_key_check) {
        (None, false) => KeyCheckChange::Keep,
        (Some(check), false) => KeyCheckChange::AddIfNone(check),
        (check, true) => KeyCheckChange::Replace(check),
    };
    let mut tx = auth.begin(&api, GroupRole::Sync).await?;
    let done = vaults::rewrap(
        &tx,
        &api.fields,
        auth.user,
        &vault_id,
        body.version,
        key,
        key_check,
    )
    .await?;
    let (version, updated_at) = match done {
        vaults::Rewrapped::Done {
            version,
            updated_at,
        } => (version, updated_at),
        vaults::Rewrapped::Stale { current } => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "stale_vault_key",
                format!(
                    "the vault key record is at version {current}, not {}: another device \
                     changed it; read it again with GET /sync/vault-key/{{vaultId}}",
                    body.version
                ),
            ));
        }
        vaults::Rewrapped::Missing => return Err(vault_not_found()),
    };
    let metadata = json!({"user": api.user_ref(auth.user), "version": version});
    api.audit(&mut tx, AuditAction::VaultKeyRewrap, 1, started, metadata)
        .await?;
    tx.commit().await?;
    Ok(Json(RewrapVaultKeyResponse {
        message: "Vault key replaced",
        vault_id,
        version,
        updated_at: iso8601(updated_at),
    }))
}
