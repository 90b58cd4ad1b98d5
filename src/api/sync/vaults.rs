//! The caller's vaults: listed a page at a time, and erased.

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

use super::*;
use crate::api::error::{ApiError, ErrorBody};
use crate::api::extract::{ApiPath, ApiQuery, CursorPage, UserAuth, page_limit};
use crate::api::store::vaults::{self};
use crate::api::{Api, iso8601};
use crate::audit::AuditAction;
use crate::postgres::pool::GroupRole;

/// The `{vaultId}` of the vault routes, as the document states it (the
/// handlers take it with `ApiPath<String>` and `check_vault_id`).
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code, reason = "only the OpenAPI derive reads it")]
pub struct VaultIdPath {
    /// The client's vault id
    #[param(
        rename = "vaultId",
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$"
    )]
    vault_id: String,
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct VaultsPage {
    /// 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
    /// The `nextCursor` of the previous page (a vaultId).
    #[param(
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$"
    )]
    after: Option<String>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct VaultSummary {
    vault_id: String,
    created_at: String,
    entry_count: i64,
    /// What the entries hold, as the client sent them (counted against
    /// api.quotas.storage_bytes).
    bytes: i64,
    last_sequence: i64,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct VaultsResponse {
    vaults: Vec<VaultSummary>,
    /// Pass as `after` for the next page; null on the last page.
    next_cursor: Option<String>,
}

/// The caller's vaults in vaultId order, a page at a time.
#[utoipa::path(get, path = "/sync/vaults", tag = "sync",
    params(VaultsPage),
    responses(
        (status = 200, body = VaultsResponse),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(in crate::api) async fn list_vaults(
    State(api): State<Arc<Api>>,
    auth: UserAuth,
    ApiQuery(page): ApiQuery<VaultsPage>,
) -> Result<Json<VaultsResponse>, ApiError> {
    let limit = page_limit(page.limit, DEFAULT_VAULT_PAGE, MAX_VAULT_PAGE)?;
    if let Some(after) = &page.after {
        check_vault_id(after)?;
    }
    let tx = auth.begin(&api, GroupRole::Query).await?;
    // One more than asked tells whether there is another page.
    let found = vaults::list(&tx, auth.user, page.after.as_deref(), limit + 1).await?;
    tx.commit().await?;
    let vaults: Vec<VaultSummary> = found
        .into_iter()
        .map(|v| VaultSummary {
            vault_id: v.vault_id,
            created_at: iso8601(v.created_at),
            entry_count: v.entries,
            bytes: v.bytes,
            last_sequence: v.entries,
        })
        .collect();
    let CursorPage {
        items: vaults,
        next: next_cursor,
    } = CursorPage::of(vaults, limit, |v| v.vault_id.clone());
    Ok(Json(VaultsResponse {
        vaults,
        next_cursor,
    }))
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeleteVaultResponse {
    message: &'static str,
    vault_id: String,
    /// The entries erased with it.
    entry_count: i64,
    /// The bytes returned to the account's storage quota.
    bytes: i64,
}

/// Erases one vault: its key record and every entry, in one transaction.
#[utoipa::path(delete, path = "/sync/vault/{vaultId}", tag = "sync",
    params(VaultIdPath),
    responses(
        (status = 200, body = DeleteVaultResponse),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(in crate::api) async fn delete_vault(
    State(api): State<Arc<Api>>,
    auth: UserAuth,
    ApiPath(vault_id): ApiPath<String>,
) -> Result<Json<DeleteVaultResponse>, ApiError> {
    let started = Instant::now();
    check_vault_id(&vault_id)?;
    let mut tx = auth.begin(&api, GroupRole::Sync).await?;
    let erased = vaults::delete(&tx, auth.user, &vault_id)
        .await?
        .ok_or_else(vault_not_found)?;
    let metadata = json!({
        "user": api.user_ref(auth.user),
        "vault": erased.vault,
        "entries": erased.entries,
        "bytes": erased.bytes,
    });
    api.audit(
        &mut tx,
        AuditAction::VaultDelete,
        erased.entries,
        started,
        metadata,
    )
    .await?;
    tx.commit().await?;
    Ok(Json(DeleteVaultResponse {
        message: "Vault erased",
        vault_id,
        entry_count: erased.entries,
        bytes: erased.bytes,
    }))
}
