//! Vault keys and the encrypted CRDT log: push and pull.
//!
//! Sequences are per vault and come from the vault row's counter, advanced
//! in the push transaction: the row lock serialises pushes to one vault
//! until commit, so numbers are gap-free, unique and committed in order,
//! and a reader paging by `afterSequence` sees a growing prefix.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use uuid::Uuid;

use super::error::{ApiError, ErrorBody};
use super::events::{Holder, Watched};
use super::extract::{
    ApiJson, ApiPath, ApiQuery, ClientAddr, Connection, UserAuth, page_limit, whole,
};
use super::store::logs::{self, NewEntry};
use super::store::vaults::{self, WrappedKey};
use super::{Api, iso8601};
use crate::audit::AuditAction;
use crate::postgres::pool::{GroupRole, ScopedTransaction};

const MAX_VAULT_ID_CHARS: usize = 200;
const MAX_TIMESTAMP_CHARS: usize = 200;
const MAX_IDEMPOTENCY_KEY_CHARS: usize = 200;
const DEFAULT_PULL_LIMIT: i64 = 100;
const MAX_PULL_LIMIT: i64 = 1000;
const MAX_KEY_CHECK_CHARS: usize = 200;
const DEFAULT_VAULT_PAGE: i64 = 100;
const MAX_VAULT_PAGE: i64 = 1000;

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

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PushEntry {
    /// Base64 ciphertext of one CRDT log entry (at most
    /// `api.max_entry_bytes` decoded, 413 beyond).
    #[schema(format = Byte, pattern = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{4}|[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)$")]
    encrypted_data: String,
    /// Base64 AES-GCM nonce.
    #[schema(format = Byte, pattern = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{4}|[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)$")]
    nonce: String,
    /// The client's hybrid logical clock timestamp.
    #[schema(min_length = 1, max_length = 200, pattern = r"^[^\u0000]+$")]
    haex_timestamp: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PushBody {
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$"
    )]
    vault_id: String,
    /// 1 to `api.max_push_entries` (10,000 by default) entries.
    #[schema(min_items = 1)]
    logs: Vec<PushEntry>,
    /// Optional: the vault key's check value (see `POST /sync/vault-key`);
    /// when the vault's record has one and this differs, nothing is stored
    /// (409 `wrong_vault_key`).
    #[schema(format = Byte, max_length = 200, pattern = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{4}|[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)$")]
    key_check: Option<String>,
}

#[derive(Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PushedEntry {
    id: Uuid,
    sequence: i64,
    haex_timestamp: String,
    created_at: String,
}

#[derive(Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PushResponse {
    message: String,
    count: usize,
    logs: Vec<PushedEntry>,
}

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PullBody {
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$"
    )]
    vault_id: String,
    /// Entries with a greater sequence are returned (default 0).
    #[serde(default, deserialize_with = "whole::i64")]
    #[schema(minimum = 0)]
    after_sequence: i64,
    /// 1 to 1000 (default 100).
    #[serde(default, deserialize_with = "whole::option_i64")]
    #[schema(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PulledEntry<'a> {
    id: Uuid,
    #[schema(value_type = String)]
    encrypted_data: Cow<'a, str>,
    #[schema(value_type = String)]
    nonce: Cow<'a, str>,
    #[schema(value_type = String)]
    haex_timestamp: Cow<'a, str>,
    sequence: i64,
    created_at: String,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PullResponse<'a> {
    logs: Vec<PulledEntry<'a>>,
    has_more: bool,
}

/// What a pulled entry adds to its text in the answer: the keys, the id,
/// the sequence and the timestamp.
const PULLED_ENTRY_OVERHEAD: usize = 160;

impl PullResponse<'_> {
    /// The answer as `serde_json` writes it (a unit test holds them
    /// equal), into one buffer of `capacity`. Written by hand because it
    /// is the hottest answer: serde_json inspects every byte of every
    /// string for escapes, a tenth of keepd's CPU under a pull load, where
    /// the ciphertexts are base64 and a check that vectorises finds them
    /// clean.
    fn to_json(&self, capacity: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(capacity);
        out.extend_from_slice(b"{\"logs\":[");
        for (i, entry) in self.logs.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(b"{\"id\":\"");
            let mut id = Uuid::encode_buffer();
            out.extend_from_slice(entry.id.hyphenated().encode_lower(&mut id).as_bytes());
            out.extend_from_slice(b"\",\"encryptedData\":");
            json_string(&mut out, &entry.encrypted_data);
            out.extend_from_slice(b",\"nonce\":");
            json_string(&mut out, &entry.nonce);
            out.extend_from_slice(b",\"haexTimestamp\":");
            json_string(&mut out, &entry.haex_timestamp);
            out.extend_from_slice(b",\"sequence\":");
            out.extend_from_slice(entry.sequence.to_string().as_bytes());
            out.extend_from_slice(b",\"createdAt\":");
            json_string(&mut out, &entry.created_at);
            out.push(b'}');
        }
        out.extend_from_slice(if self.has_more {
            b"],\"hasMore\":true}"
        } else {
            b"],\"hasMore\":false}"
        });
        out
    }
}

/// `value` as a JSON string: copied as it is when nothing in it needs an
/// escape (the fold has no early exit, so it vectorises), else by
/// serde_json.
fn json_string(out: &mut Vec<u8>, value: &str) {
    let needs_escape = value.bytes().fold(false, |any, b| {
        any | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if needs_escape {
        serde_json::to_writer(&mut *out, value).expect("writing to a Vec cannot fail");
    } else {
        out.push(b'"');
        out.extend_from_slice(value.as_bytes());
        out.push(b'"');
    }
}

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
pub(super) async fn store_vault_key(
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
pub(super) async fn vault_key(
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

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    // Visible ASCII only (0x21..=0x7E): `to_str` alone admits spaces and
    // tabs, which the documented form and the OpenAPI pattern exclude.
    let bytes = value.as_bytes();
    match value.to_str() {
        Ok(key)
            if !bytes.is_empty()
                && bytes.len() <= MAX_IDEMPOTENCY_KEY_CHARS
                && bytes.iter().all(|b| (0x21..=0x7E).contains(b)) =>
        {
            Ok(Some(key.to_string()))
        }
        _ => Err(ApiError::bad_request(
            "invalid_idempotency_key",
            format!(
                "the Idempotency-Key header must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} visible ASCII characters"
            ),
        )),
    }
}

/// Appends encrypted log entries to a vault, all or none.
#[utoipa::path(post, path = "/sync/push", tag = "sync",
    request_body = PushBody,
    params(("Idempotency-Key" = Option<String>, Header,
        description = "A retry with the same key returns the first result and stores nothing again",
        pattern = r"^[\x21-\x7E]{1,200}$")),
    responses(
        (status = 200, body = PushResponse),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 422, description = "The Idempotency-Key was used for another request", body = ErrorBody),
        (status = 503, description = "Nothing was stored; retry", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(super) async fn push(
    State(api): State<Arc<Api>>,
    auth: UserAuth,
    headers: HeaderMap,
    ApiJson(body): ApiJson<PushBody>,
) -> Result<Json<PushResponse>, ApiError> {
    let started = Instant::now();
    let idempotency = idempotency_key(&headers)?;
    check_vault_id(&body.vault_id)?;
    let count = body.logs.len();
    if count == 0 || count > api.settings.max_push_entries {
        return Err(ApiError::bad_request(
            "invalid_batch_size",
            format!(
                "`logs` must hold 1 to {} entries (api.max_push_entries)",
                api.settings.max_push_entries
            ),
        ));
    }
    check_key_check(body.key_check.as_deref())?;
    let fingerprint = push_fingerprint(&body);
    let mut entries = Vec::with_capacity(count);
    for (i, entry) in body.logs.into_iter().enumerate() {
        let data = check_base64(&format!("logs[{i}].encryptedData"), &entry.encrypted_data)?;
        if data.len() > api.settings.max_entry_bytes {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "entry_too_large",
                format!(
                    "`logs[{i}].encryptedData` holds {} bytes; api.max_entry_bytes allows {}",
                    data.len(),
                    api.settings.max_entry_bytes
                ),
            ));
        }
        check_base64(&format!("logs[{i}].nonce"), &entry.nonce)?;
        check_text(
            "invalid_timestamp",
            &format!("logs[{i}].haexTimestamp"),
            &entry.haex_timestamp,
            MAX_TIMESTAMP_CHARS,
        )?;
        entries.push(NewEntry {
            encrypted_data: entry.encrypted_data,
            nonce: entry.nonce,
            haex_timestamp: entry.haex_timestamp,
        });
    }

    let mut tx = auth.begin(&api, GroupRole::Sync).await?;
    if let Some(key) = &idempotency
        && let Some(first) = stored_push(&api, &tx, &auth, key, &fingerprint).await?
    {
        return Ok(Json(first));
    }
    if let Some(sent) = &body.key_check {
        let stored = vaults::key_check(&tx, auth.user, &body.vault_id)
            .await?
            .ok_or_else(vault_not_found)?;
        if stored.is_some_and(|stored| stored != *sent) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "wrong_vault_key",
                "this push was encrypted under another key than the vault's (its keyCheck \
                 differs); nothing was stored: fetch the vault's key with GET \
                 /sync/vault-key/{vaultId}",
            ));
        }
    }
    let appended = logs::append(&tx, &api.fields, auth.user, &body.vault_id, entries)
        .await?
        .ok_or_else(vault_not_found)?;
    let (first, last) = match (appended.entries.first(), appended.entries.last()) {
        (Some(first), Some(last)) => (first.sequence, last.sequence),
        _ => {
            return Err(ApiError::internal(
                "push",
                &"a stored batch came back empty",
            ));
        }
    };
    let logs = appended
        .entries
        .into_iter()
        .map(|entry| PushedEntry {
            id: entry.id,
            sequence: entry.sequence,
            haex_timestamp: entry.haex_timestamp,
            created_at: iso8601(entry.created_at),
        })
        .collect();
    let response = PushResponse {
        message: format!("{count} logs pushed successfully"),
        count,
        logs,
    };
    let metadata = json!({
        "user": api.user_ref(auth.user),
        "vault": appended.vault,
        "firstSequence": first,
        "lastSequence": last,
    });
    // The quota check and the idempotency record go out together; a
    // refusal drops the transaction, so nothing is stored.
    let saved = async {
        let Some(key) = &idempotency else {
            return Ok(None);
        };
        let stored =
            serde_json::to_value(&response).map_err(|e| ApiError::internal("push response", &e))?;
        let ttl = api.settings.idempotency_ttl;
        let won = logs::save_push(&tx, auth.user, key, &fingerprint, &stored, ttl).await?;
        Ok::<_, ApiError>((!won).then_some(key.as_str()))
    };
    let announced = logs::announce(
        &tx,
        super::events::VaultEvent {
            vault: appended.vault,
            sequence: last,
        },
    );
    let (_, lost_to, _) = tokio::try_join!(api.check_quotas(&tx, auth.user), saved, async {
        announced.await.map_err(ApiError::from)
    })?;
    if let Some(key) = lost_to {
        // A concurrent retry with this key committed first: this attempt
        // is rolled back and the first result is the answer.
        drop(tx);
        let tx = auth.begin(&api, GroupRole::Sync).await?;
        return stored_push(&api, &tx, &auth, key, &fingerprint)
            .await?
            .map(Json)
            .ok_or_else(|| ApiError::internal("idempotent push", &"stored result vanished"));
    }
    api.audit(
        &mut tx,
        AuditAction::SyncPush,
        count as i64,
        started,
        metadata,
    )
    .await?;
    tx.commit().await?;
    Ok(Json(response))
}

/// The first answer to this Idempotency-Key, if it names this same
/// request; 422 if it named another (a client would otherwise believe
/// data saved that was not).
async fn stored_push(
    api: &Api,
    tx: &ScopedTransaction,
    auth: &UserAuth,
    key: &str,
    fingerprint: &[u8],
) -> Result<Option<PushResponse>, ApiError> {
    let stored = logs::stored_push(tx, auth.user, key, api.settings.idempotency_ttl).await?;
    let Some(stored) = stored else {
        return Ok(None);
    };
    if stored
        .request_hash
        .is_some_and(|first| first.as_slice() != fingerprint)
    {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reused",
            "this Idempotency-Key was used for a different request (another body or vault); \
             use a new key for a new request",
        ));
    }
    serde_json::from_value(stored.response)
        .map(Some)
        .map_err(|e| ApiError::internal("stored push response", &e))
}

/// SHA-256 over the route and every field of the push, each length-
/// prefixed, so two requests share it only if they are the same request.
fn push_fingerprint(body: &PushBody) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    let mut field = |bytes: &[u8]| {
        hash.update((bytes.len() as u64).to_be_bytes());
        hash.update(bytes);
    };
    field(b"POST /sync/push");
    field(body.vault_id.as_bytes());
    for entry in &body.logs {
        field(entry.encrypted_data.as_bytes());
        field(entry.nonce.as_bytes());
        field(entry.haex_timestamp.as_bytes());
    }
    hash.finalize().to_vec()
}

/// Log entries after a sequence number, in order. 503
/// `response_budget_exhausted` (with Retry-After) while answers this client
/// has not read yet fill its response budget.
#[utoipa::path(post, path = "/sync/pull", tag = "sync",
    request_body = PullBody,
    responses(
        (status = 200, body = PullResponse),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(super) async fn pull(
    State(api): State<Arc<Api>>,
    auth: UserAuth,
    ClientAddr(client): ClientAddr,
    Connection(connection): Connection,
    ApiJson(body): ApiJson<PullBody>,
) -> Result<Response, ApiError> {
    check_vault_id(&body.vault_id)?;
    let limit = page_limit(body.limit, DEFAULT_PULL_LIMIT, MAX_PULL_LIMIT)?;
    if body.after_sequence < 0 {
        return Err(ApiError::bad_request(
            "invalid_after_sequence",
            "`afterSequence` must be 0 or more",
        ));
    }
    // The page is reserved before Postgres sends it: what a client that
    // never reads its answers can pin is its response budget, no more.
    let reservation = match &connection {
        Some(connection) => {
            let most = api.settings.max_pull_bytes + limit as usize * PULLED_ENTRY_OVERHEAD;
            let client = api.settings.prefixes.client(client);
            let reserved = connection.reserve(client, most, RESPONSE_BUDGET_WAIT).await;
            Some(reserved.map_err(ApiError::response_budget)?)
        }
        None => None,
    };
    let tx = auth.begin(&api, GroupRole::Query).await?;
    let budget = api.settings.max_pull_bytes as i64;
    let page = logs::page(
        &tx,
        auth.user,
        &body.vault_id,
        body.after_sequence,
        limit,
        budget,
    )
    .await?
    .ok_or_else(vault_not_found)?;
    tx.commit().await?;
    let logs: Vec<_> = page
        .entries(&api.fields)?
        .into_iter()
        .map(|entry| PulledEntry {
            id: entry.id,
            encrypted_data: entry.encrypted_data,
            nonce: entry.nonce,
            haex_timestamp: entry.haex_timestamp,
            sequence: entry.sequence,
            created_at: iso8601(entry.created_at),
        })
        .collect();
    // The answer is written once into a buffer of its final size, straight
    // from the rows Postgres sent (a page is up to `api.max_pull_bytes`).
    let capacity = page.text_bytes() + logs.len() * PULLED_ENTRY_OVERHEAD + 32;
    let answer = PullResponse {
        has_more: page.has_more(),
        logs,
    };
    let answer = answer.to_json(capacity);
    drop(page);
    let body = match reservation {
        Some(reservation) => reservation.body(answer),
        None => axum::body::Body::from(answer),
    };
    Ok(([(CONTENT_TYPE, "application/json")], body).into_response())
}

/// How long a pull waits for response budget before answering 503.
const RESPONSE_BUDGET_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_keys_are_visible_ascii_only() {
        let key = |value: &[u8]| {
            let mut headers = HeaderMap::new();
            headers.insert(
                "idempotency-key",
                axum::http::HeaderValue::from_bytes(value).unwrap(),
            );
            idempotency_key(&headers)
        };
        assert_eq!(idempotency_key(&HeaderMap::new()).unwrap(), None);
        assert_eq!(key(b"retry-1").unwrap().as_deref(), Some("retry-1"));
        let edges: String = (0x21u8..=0x7E).map(char::from).collect();
        assert_eq!(key(edges.as_bytes()).unwrap().as_deref(), Some(&*edges));
        assert!(key(&[b'k'; MAX_IDEMPOTENCY_KEY_CHARS]).is_ok());
        for bad in [
            &b"a b"[..],
            b"a\tb",
            b"",
            b"caf\xc3\xa9",
            b"\x80",
            &[b'k'; MAX_IDEMPOTENCY_KEY_CHARS + 1],
        ] {
            let e = key(bad).expect_err(&format!("{bad:?} was accepted"));
            assert_eq!(e.code(), "invalid_idempotency_key");
        }
    }

    #[test]
    fn pull_answer_is_what_serde_json_writes() {
        let entry = |data: &'static str, stamp: &'static str, sequence| PulledEntry {
            id: Uuid::new_v4(),
            encrypted_data: Cow::Borrowed(data),
            nonce: Cow::Owned("bm9uY2U=".into()),
            haex_timestamp: Cow::Borrowed(stamp),
            sequence,
            created_at: iso8601(std::time::SystemTime::UNIX_EPOCH),
        };
        let answers = [
            PullResponse {
                logs: vec![],
                has_more: false,
            },
            PullResponse {
                logs: vec![
                    entry("aGVsbG8gd29ybGQ=", "0001-a", 1),
                    // Not base64: what an older client may have stored.
                    entry(
                        "quote \" backslash \\ tab \t nul-ish \u{1} é ☃",
                        "\u{7f}\n",
                        2,
                    ),
                    entry("", "", i64::MAX),
                ],
                has_more: true,
            },
        ];
        for answer in answers {
            let by_hand = answer.to_json(0);
            assert_eq!(
                String::from_utf8(by_hand).unwrap(),
                serde_json::to_string(&answer).unwrap()
            );
        }
    }
}

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
pub(super) async fn list_vaults(
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
    let mut vaults: Vec<VaultSummary> = found
        .into_iter()
        .map(|v| VaultSummary {
            vault_id: v.vault_id,
            created_at: iso8601(v.created_at),
            entry_count: v.entries,
            bytes: v.bytes,
            last_sequence: v.entries,
        })
        .collect();
    let next_cursor = if vaults.len() as i64 > limit {
        vaults.truncate(limit as usize);
        vaults.last().map(|v| v.vault_id.clone())
    } else {
        None
    };
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
pub(super) async fn delete_vault(
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
    /// Optional: a key check for a record that had none.
    #[schema(format = Byte, max_length = 200, pattern = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{4}|[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)$")]
    key_check: Option<String>,
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
pub(super) async fn rewrap_vault_key(
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
    let mut tx = auth.begin(&api, GroupRole::Sync).await?;
    let done = vaults::rewrap(
        &tx,
        &api.fields,
        auth.user,
        &vault_id,
        body.version,
        key,
        body.key_check.as_deref(),
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

/// One event of `GET /sync/events` as the stream frames it.
#[derive(ToSchema)]
#[allow(dead_code)] // a description for the OpenAPI document only
pub struct SyncEventFrame {
    /// `sync` for a new last sequence; `end` for the stream's last event.
    #[schema(pattern = "^(sync|end)$")]
    event: String,
    /// The vault's new last sequence, which `Last-Event-ID` resumes from
    /// (absent on `end`).
    #[schema(pattern = "^[0-9]+$")]
    id: Option<String>,
    /// JSON text: `{"vaultId": "...", "sequence": N}` (never ciphertext),
    /// or on `end` `{"reason": "..."}`: `logout`, `password_changed`,
    /// `account_disabled`, `account_deleted`, `session_expired` (log in
    /// again), `idle` or `lagged` (reconnect with `Last-Event-ID`).
    data: String,
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(rename_all = "camelCase")]
pub struct EventsQuery {
    /// The vault to watch.
    #[param(
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]+$"
    )]
    vault_id: String,
}

/// Live updates of one vault as Server-Sent Events: `event: sync`, `id`
/// the sequence, `data` `{"vaultId", "sequence"}` whenever entries commit
/// (on any node of a cluster), never ciphertext; the first event is the
/// vault's head (past `Last-Event-ID` when given, so a reconnect resumes
/// without a gap); a comment line every `api.events.heartbeat`. The last
/// event is `end` with the reason: the session ended (on any node) or
/// expired, the stream was idle for `api.events.max_idle`, or it fell
/// behind.
#[utoipa::path(get, path = "/sync/events", tag = "sync",
    params(EventsQuery,
        ("Last-Event-ID" = Option<i64>, Header, nullable = false,
            description = "The last sequence this client has seen", minimum = 0)),
    responses(
        (status = 200, description = "An event stream", content_type = "text/event-stream", body = SyncEventFrame),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 429, description = "api.events.max_streams or max_streams_per_account reached", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(super) async fn events(
    State(api): State<Arc<Api>>,
    auth: UserAuth,
    ClientAddr(client): ClientAddr,
    Connection(connection): Connection,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<EventsQuery>,
) -> Result<Response, ApiError> {
    use axum::response::sse::{KeepAlive, Sse};
    check_vault_id(&query.vault_id)?;
    let seen = match headers.get("last-event-id") {
        None => None,
        Some(value) => match value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<i64>().ok())
        {
            Some(seen) if seen >= 0 => Some(seen),
            _ => {
                return Err(ApiError::bad_request(
                    "invalid_last_event_id",
                    "Last-Event-ID must be a sequence this stream sent (0 or more)",
                ));
            }
        },
    };
    // Subscribed before the head is read: nothing in between is missed.
    let (receiver, slot) = api.events.subscribe(Holder {
        user: auth.user,
        session: auth.session,
        client: api.settings.prefixes.client(client),
        expires: auth.expires,
    })?;
    let tx = auth.begin(&api, GroupRole::Query).await?;
    let head = vaults::head(&tx, auth.user, &query.vault_id).await?;
    tx.commit().await?;
    let (vault, head) = head.ok_or_else(vault_not_found)?;
    let watched = Watched {
        vault,
        vault_id: query.vault_id,
        head,
        seen,
    };
    // The connection leaves the request slots while it streams.
    let mark = connection.map(|c| c.connection.stream());
    let stream = super::events::watch(receiver, slot, watched, mark);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(api.settings.events.heartbeat.get()))
        .into_response())
}
