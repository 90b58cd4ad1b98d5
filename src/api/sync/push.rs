//! `POST /sync/push`: encrypted entries appended to a vault, all or none,
//! named by an Idempotency-Key when the client gives one.

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use uuid::Uuid;

use super::*;
use crate::api::error::{ApiError, ErrorBody};
use crate::api::extract::{ApiJson, UserAuth};
use crate::api::store::StoreError;
use crate::api::store::logs::{
    self, Appended, Idempotency, NewEntry, PushBatch, PushOutcome, StoredPush,
};
use crate::api::store::usage;
use crate::api::{Api, iso8601};
use crate::audit::AuditAction;
use crate::postgres::pool::GroupRole;

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
pub(in crate::api) async fn push(
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

    // The bytes are counted before the transaction (see `usage::reserve`);
    // whatever does not commit below gives them back.
    let bytes = entries.iter().map(NewEntry::size_bytes).sum();
    let reservation = match usage::reserve(
        &api.pool,
        auth.user,
        bytes,
        api.settings.quotas.storage_bytes,
    )
    .await?
    {
        Ok(reservation) => reservation,
        // A retry of a push that reached the quota is answered as before.
        Err(exceeded) => match &idempotency {
            Some(key) => match recorded(&api, &auth, key, &fingerprint).await? {
                Some(first) => return Ok(Json(first)),
                None => return Err(ApiError::quota_exceeded(exceeded)),
            },
            None => return Err(ApiError::quota_exceeded(exceeded)),
        },
    };
    let mut tx = auth.begin(&api, GroupRole::Sync).await?;
    let batch = PushBatch {
        user: auth.user,
        vault_id: &body.vault_id,
        entries,
        key_check: body.key_check.as_deref(),
        idempotency: idempotency.as_deref().map(|key| Idempotency {
            key,
            fingerprint: &fingerprint,
            ttl: api.settings.idempotency_ttl,
        }),
    };
    let outcome = logs::push(&tx, &api.fields, batch, answer).await?;
    let (event, first, response, raced) = match outcome {
        PushOutcome::Recorded(first) => return Ok(Json(replayed(first, &fingerprint)?)),
        PushOutcome::NoVault => return Err(vault_not_found()),
        PushOutcome::WrongKey => return Err(wrong_vault_key()),
        PushOutcome::Expired => {
            return Err(ApiError::retry(
                "idempotency_key_expired",
                "this Idempotency-Key's record expired while the push was checked against it; \
                 nothing was stored: send the push again",
            ));
        }
        PushOutcome::Stored {
            event,
            first,
            response,
            raced,
        } => (event, first, response, raced),
    };
    if raced {
        // A concurrent retry with this key committed first: this attempt
        // is rolled back and the first result is the answer.
        drop(tx);
        let key = idempotency.as_deref().unwrap_or_default();
        let first = recorded(&api, &auth, key, &fingerprint)
            .await?
            .ok_or_else(|| ApiError::internal("idempotent push", &"stored result vanished"))?;
        return Ok(Json(first));
    }
    let metadata = json!({
        "user": api.user_ref(auth.user),
        "vault": event.vault,
        "firstSequence": first,
        "lastSequence": event.sequence,
    });
    api.audit(
        &mut tx,
        AuditAction::SyncPush,
        count as i64,
        started,
        metadata,
    )
    .await?;
    // The commit and its event run to their end even if the client goes
    // away meanwhile: a committed push is always announced.
    let announced = api.clone();
    tokio::spawn(async move {
        reservation.claim_and_commit(tx).await?;
        announced.announcer.announce(event);
        Ok::<_, StoreError>(())
    })
    .await
    .map_err(|e| ApiError::internal("push commit", &e))??;
    Ok(Json(response))
}

/// 409 `wrong_vault_key`: the push was sealed under another key.
fn wrong_vault_key() -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "wrong_vault_key",
        "this push was encrypted under another key than the vault's (its keyCheck differs); \
         nothing was stored: fetch the vault's key with GET /sync/vault-key/{vaultId}",
    )
}

/// The answer recorded under `key`, read in a transaction of its own (for
/// a retry this push's own transaction did not answer), as `replayed`
/// gives it; None when no live record has the key.
async fn recorded(
    api: &Api,
    auth: &UserAuth,
    key: &str,
    fingerprint: &[u8],
) -> Result<Option<PushResponse>, ApiError> {
    let tx = auth.begin(api, GroupRole::Sync).await?;
    let ttl = api.settings.idempotency_ttl;
    logs::stored_push(&tx, &api.fields, auth.user, key, ttl, answer)
        .await?
        .map(|first| replayed(first, fingerprint))
        .transpose()
}

/// The first answer to this Idempotency-Key, if it names this same
/// request; 422 if it named another (a client would otherwise believe
/// data saved that was not).
fn replayed(first: StoredPush<PushResponse>, fingerprint: &[u8]) -> Result<PushResponse, ApiError> {
    if first
        .request_hash
        .is_some_and(|hash| hash.as_slice() != fingerprint)
    {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reused",
            "this Idempotency-Key was used for a different request (another body or vault); \
             use a new key for a new request",
        ));
    }
    first.response.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "vault_not_found",
            "this Idempotency-Key's push was stored, but its entries are gone since (its vault \
             was deleted); nothing was stored again",
        )
    })
}

/// The answer to a push that stored `appended` (made again from the
/// stored entries for a retry under its Idempotency-Key).
fn answer(appended: Appended) -> PushResponse {
    let count = appended.entries.len();
    PushResponse {
        message: format!("{count} logs pushed successfully"),
        count,
        logs: appended
            .entries
            .into_iter()
            .map(|entry| PushedEntry {
                id: entry.id,
                sequence: entry.sequence,
                haex_timestamp: entry.haex_timestamp,
                created_at: iso8601(entry.created_at),
            })
            .collect(),
    }
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
}
