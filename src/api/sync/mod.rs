//! Vault keys and the encrypted CRDT log: push and pull.
//!
//! Sequences are per vault and come from the vault row's counter, advanced
//! in the push transaction: the row lock serialises pushes to one vault
//! until commit, so numbers are gap-free, unique and committed in order,
//! and a reader paging by `afterSequence` sees a growing prefix.

mod events;
mod keys;
mod pull;
mod push;
mod vaults;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;

use super::error::ApiError;

pub(super) use events::{__path_events, events};
pub use keys::StoreVaultKeyBody;
pub(super) use keys::{
    __path_rewrap_vault_key, __path_store_vault_key, __path_vault_key, rewrap_vault_key,
    store_vault_key, vault_key,
};
pub use pull::PullBody;
pub(super) use pull::{__path_pull, pull};
pub use push::PushBody;
pub(super) use push::{__path_push, push};
pub(super) use vaults::{__path_delete_vault, __path_list_vaults, delete_vault, list_vaults};

const MAX_VAULT_ID_CHARS: usize = 200;
const MAX_TIMESTAMP_CHARS: usize = 200;
const MAX_IDEMPOTENCY_KEY_CHARS: usize = 200;
const DEFAULT_PULL_LIMIT: i64 = 100;
const MAX_PULL_LIMIT: i64 = 1000;
const MAX_KEY_CHECK_CHARS: usize = 200;
const DEFAULT_VAULT_PAGE: i64 = 100;
const MAX_VAULT_PAGE: i64 = 1000;

fn check_vault_id(vault_id: &str) -> Result<(), ApiError> {
    let chars = vault_id.chars().count();
    if chars == 0 || chars > MAX_VAULT_ID_CHARS || vault_id.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "invalid_vault_id",
            format!("`vaultId` must be 1 to {MAX_VAULT_ID_CHARS} printable characters"),
        ));
    }
    Ok(())
}

/// `value` must be 1 to `max` characters and hold no NUL, which Postgres
/// cannot store in text (it would answer an error, not keep the value).
pub(super) fn check_text(
    code: &'static str,
    field: &str,
    value: &str,
    max: usize,
) -> Result<(), ApiError> {
    let chars = value.chars().count();
    if chars == 0 || chars > max {
        return Err(ApiError::bad_request(
            code,
            format!("`{field}` must be 1 to {max} characters"),
        ));
    }
    if value.contains('\0') {
        return Err(ApiError::bad_request(
            code,
            format!("`{field}` must not contain NUL (U+0000)"),
        ));
    }
    Ok(())
}

/// `value` must be non-empty standard base64 (what clients send for bytes).
pub(super) fn check_base64(field: &str, value: &str) -> Result<Vec<u8>, ApiError> {
    match BASE64.decode(value) {
        Ok(bytes) if !bytes.is_empty() => Ok(bytes),
        _ => Err(ApiError::bad_request(
            "invalid_base64",
            format!("`{field}` must be non-empty standard base64 (RFC 4648, with padding)"),
        )),
    }
}

/// A key check, when given: base64 of at most `MAX_KEY_CHECK_CHARS`.
fn check_key_check(key_check: Option<&str>) -> Result<(), ApiError> {
    if let Some(value) = key_check {
        if value.len() > MAX_KEY_CHECK_CHARS {
            return Err(ApiError::bad_request(
                "invalid_key_check",
                format!("`keyCheck` must be at most {MAX_KEY_CHECK_CHARS} characters of base64"),
            ));
        }
        check_base64("keyCheck", value)?;
    }
    Ok(())
}

fn vault_not_found() -> ApiError {
    ApiError::not_found(
        "vault_not_found",
        "no vault with this vaultId for this account; store its key with POST /sync/vault-key first",
    )
}
