//! `POST /sync/pull`: entries after a sequence, a page at a time, within
//! the pull's byte budget and the client's response budget.

use std::borrow::Cow;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::*;
use crate::api::error::{ApiError, ErrorBody};
use crate::api::extract::{ApiJson, ClientAddr, Connection, UserAuth, page_limit, whole};
use crate::api::store::logs::{self};
use crate::api::{Api, iso8601};
use crate::postgres::pool::GroupRole;

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
pub(in crate::api) async fn pull(
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
    let budget = api.settings.max_pull_bytes as i64;
    let page = logs::page(
        &auth.reader(&api, GroupRole::Query),
        auth.user,
        &body.vault_id,
        body.after_sequence,
        limit,
        budget,
    )
    .await?
    .ok_or_else(vault_not_found)?;
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
