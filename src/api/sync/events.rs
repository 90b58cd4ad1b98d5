//! `GET /sync/events`: live updates of one vault (`api::events` keeps
//! the streams).

use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use utoipa::ToSchema;

use super::*;
use crate::api::Api;
use crate::api::error::{ApiError, ErrorBody};
use crate::api::events::{Holder, Watched};
use crate::api::extract::{ApiQuery, ClientAddr, Connection, UserAuth};
use crate::api::store::vaults::{self};
use crate::postgres::pool::GroupRole;

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
    /// again) or `idle` (reconnect with `Last-Event-ID`).
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
pub(in crate::api) async fn events(
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
    let slot = api.events.subscribe(Holder {
        user: auth.user,
        session: auth.session,
        client: api.settings.prefixes.client(client),
        expires: auth.expires,
    })?;
    let tx = auth.begin(&api, GroupRole::Query).await?;
    let (vault, _) = vaults::head(&tx, auth.user, &query.vault_id)
        .await?
        .ok_or_else(vault_not_found)?;
    // Followed before the head is read: nothing in between is missed.
    let following = api.events.follow(vault);
    let (_, head) = vaults::head(&tx, auth.user, &query.vault_id)
        .await?
        .ok_or_else(vault_not_found)?;
    tx.commit().await?;
    let watched = Watched {
        vault_id: query.vault_id,
        head,
        seen,
    };
    // The connection leaves the request slots while it streams.
    let mark = connection.map(|c| c.connection.stream());
    let stream = crate::api::events::watch(following, slot, watched, mark);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(api.settings.events.heartbeat.get()))
        .into_response())
}
