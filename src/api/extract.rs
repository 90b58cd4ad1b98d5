//! Extractors: what a handler can ask for. `UserAuth` is the only way to
//! learn who the caller is and to reach their data, so a handler that
//! needs a user gets nothing without a live session; `ApiJson`, `ApiPath` and `ApiQuery`
//! turn every malformed input into an `ApiError` instead of axum's plain
//! text rejections.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::Api;
use super::error::ApiError;
use super::store::Reader;
use super::store::accounts::{self, LiveSession};
use crate::postgres::pool::{GroupRole, OperationContext, ScopedTransaction};
use crate::tokens::TokenError;

/// A JSON body of type `T`.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => Err(json_error(rejection)),
        }
    }
}

fn json_error(rejection: JsonRejection) -> ApiError {
    match rejection {
        JsonRejection::JsonDataError(e) => ApiError::bad_request(
            "invalid_body",
            format!(
                "the JSON body does not have the expected fields and types: {}",
                e.body_text().trim_start_matches(
                    "Failed to deserialize the JSON body into the target type: "
                )
            ),
        ),
        JsonRejection::JsonSyntaxError(e) => ApiError::bad_request(
            "malformed_json",
            format!(
                "the body is not valid JSON: {}",
                e.body_text()
                    .trim_start_matches("Failed to parse the request body as JSON: ")
            ),
        ),
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as JSON with `Content-Type: application/json`",
        ),
        other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "the request body exceeds api.max_body_bytes; send less per request",
        ),
        other => ApiError::bad_request(
            "unreadable_body",
            format!("the request body could not be read: {}", other.body_text()),
        ),
    }
}

/// Path parameters of type `T`.
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| ApiPath(p.0))
            .map_err(|e: PathRejection| {
                ApiError::bad_request(
                    "invalid_path",
                    format!("a path parameter is invalid: {}", e.body_text()),
                )
            })
    }
}

/// Query parameters of type `T`.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| ApiQuery(q.0))
            .map_err(|e: QueryRejection| {
                ApiError::bad_request(
                    "invalid_query",
                    format!("a query parameter is invalid: {}", e.body_text()),
                )
            })
    }
}

/// The caller's network address (rate limits, audit): the peer, or whom
/// a trusted proxy says it forwards for (`api.trusted_proxies`).
pub struct ClientAddr(pub std::net::IpAddr);

impl FromRequestParts<Arc<Api>> for ClientAddr {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, api: &Arc<Api>) -> Result<Self, ApiError> {
        let ConnectInfo(peer) = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .ok_or_else(|| ApiError::internal("client address", &"no connect info"))?;
        Ok(ClientAddr(
            api.settings
                .trusted_proxies
                .client(peer.ip(), &parts.headers),
        ))
    }
}

/// An authenticated caller: a valid token of this node, counted against
/// the account's rate limit. Its session is checked in every transaction
/// it opens, and `begin` and `reader` are a handler's only ways to the
/// caller's data, so a revoked or expired session reaches nothing.
pub struct UserAuth {
    pub user: Uuid,
    pub session: Uuid,
    /// When the token (and so, at the latest, the session) expires.
    pub expires: std::time::SystemTime,
}

impl UserAuth {
    /// A transaction as `role` for this caller (row-level security shows it
    /// only the caller's rows), opened with the session checked live in
    /// the same round trip; 401 when it has ended. With
    /// `api.auth.require_second_factor`, the synced data (the sync and
    /// query roles) answers only a session that proved a second factor:
    /// 403 naming what to do otherwise.
    pub async fn begin(&self, api: &Api, role: GroupRole) -> Result<ScopedTransaction, ApiError> {
        let ctx = OperationContext::user(role, self.user.to_string());
        let opened = accounts::begin_in_session(&api.pool, &ctx, self.session).await?;
        Ok(admit(api, role, opened)?.0)
    }

    /// Reads as `role` for this caller, each statement in a transaction
    /// of its own with the session checked as `begin` does, in one round
    /// trip: for a handler whose whole work is a read.
    pub fn reader<'a>(&'a self, api: &'a Api, role: GroupRole) -> SessionReader<'a> {
        SessionReader {
            auth: self,
            api,
            role,
        }
    }
}

/// `UserAuth::reader`.
pub struct SessionReader<'a> {
    auth: &'a UserAuth,
    api: &'a Api,
    role: GroupRole,
}

impl Reader for SessionReader<'_> {
    type Error = ApiError;

    async fn read(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, ApiError> {
        let ctx = OperationContext::user(self.role, self.auth.user.to_string());
        let read =
            accounts::read_in_session(&self.api.pool, &ctx, self.auth.session, sql, params).await?;
        Ok(admit(self.api, self.role, read)?.0)
    }
}

/// What a transaction of `role` found of its session: 401 when it has
/// ended; 403 when the synced data (the sync and query roles) needs a
/// second factor the session has not proved (`api.auth.require_second_factor`).
fn admit<T>(
    api: &Api,
    role: GroupRole,
    found: Option<(T, LiveSession)>,
) -> Result<(T, LiveSession), ApiError> {
    let (found, session) = found.ok_or_else(|| {
        ApiError::unauthorized("the session has ended (logout or password change); log in again")
    })?;
    let synced_data = matches!(role, GroupRole::Sync | GroupRole::Query);
    if synced_data && api.settings.auth.require_second_factor && !session.second_factor {
        return Err(ApiError::new(
            axum::http::StatusCode::FORBIDDEN,
            "second_factor_required",
            "this server requires a second factor (api.auth.require_second_factor): enrol \
             with POST /auth/totp, confirm with POST /auth/totp/confirm, or log in with \
             your code",
        ));
    }
    Ok((found, session))
}

impl FromRequestParts<Arc<Api>> for UserAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, api: &Arc<Api>) -> Result<Self, ApiError> {
        let token = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let verified = match token {
            Some(token) => api
                .root_keys()
                .tokens
                .verify(token.trim())
                .map_err(|e| match e {
                    TokenError::Expired => {
                        ApiError::unauthorized("the token has expired; log in again")
                    }
                    other => ApiError::unauthorized(format!("the token is not valid: {other}")),
                }),
            None => Err(ApiError::unauthorized(
                "send `Authorization: Bearer <token>` from /auth/login",
            )),
        };
        // Without a valid token the caller is only an address, and counted
        // as one; with one, as the account (before any database work).
        let claims = match verified {
            Ok(claims) => claims,
            Err(refused) => {
                let ClientAddr(client) = ClientAddr::from_request_parts(parts, api).await?;
                api.limits.address(client).map_err(ApiError::rate_limited)?;
                return Err(refused);
            }
        };
        api.limits
            .account(claims.sub)
            .map_err(ApiError::rate_limited)?;
        Ok(UserAuth {
            user: claims.sub,
            session: claims.sid,
            expires: std::time::UNIX_EPOCH + std::time::Duration::from_secs(claims.exp),
        })
    }
}

/// The edge's handle on the request's connection (mark a stream, reserve
/// response bytes); None when the router is driven without the edge.
pub struct Connection(pub Option<crate::edge::RequestContext>);

impl<S: Send + Sync> FromRequestParts<S> for Connection {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Connection(
            parts
                .extensions
                .get::<crate::edge::RequestContext>()
                .cloned(),
        ))
    }
}

/// A page size: `limit` when given, else `default`; 1 to `max`, or 400
/// `invalid_limit` naming the range.
pub fn page_limit(limit: Option<i64>, default: i64, max: i64) -> Result<i64, ApiError> {
    let limit = limit.unwrap_or(default);
    if !(1..=max).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_limit",
            format!("`limit` must be 1 to {max}"),
        ));
    }
    Ok(limit)
}

/// One page of a cursor-paged list: the store was asked for `limit + 1`
/// items, and the one past the limit only says that another page follows,
/// whose cursor is the last item kept.
pub struct CursorPage<T, C> {
    pub items: Vec<T>,
    pub next: Option<C>,
}

impl<T, C> CursorPage<T, C> {
    pub fn of(mut items: Vec<T>, limit: i64, cursor: impl Fn(&T) -> C) -> CursorPage<T, C> {
        let limit = usize::try_from(limit).unwrap_or(0);
        if items.len() <= limit {
            return CursorPage { items, next: None };
        }
        items.truncate(limit);
        let next = items.last().map(cursor);
        CursorPage { items, next }
    }
}

/// Integers in a JSON body as JSON Schema counts them: `566` and `566.0`
/// alike (a number whose fraction is zero is an integer there, and a
/// generated client may send either); a fraction or an out-of-range value
/// is refused by name.
pub mod whole {
    use serde::de::{Deserialize, Deserializer, Error};

    fn exact<'de, D: Deserializer<'de>>(number: serde_json::Number) -> Result<i64, D::Error> {
        if let Some(n) = number.as_i64() {
            return Ok(n);
        }
        match number.as_f64() {
            Some(f) if f.fract() == 0.0 && f >= i64::MIN as f64 && f < i64::MAX as f64 => {
                Ok(f as i64)
            }
            _ => Err(D::Error::custom(format!(
                "{number} is not a whole number in range"
            ))),
        }
    }

    pub fn i64<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
        exact::<D>(serde_json::Number::deserialize(deserializer)?)
    }

    pub fn option_i64<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<i64>, D::Error> {
        match Option::<serde_json::Number>::deserialize(deserializer)? {
            Some(number) => exact::<D>(number).map(Some),
            None => Ok(None),
        }
    }

    pub fn i32<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i32, D::Error> {
        let n = i64(deserializer)?;
        i32::try_from(n).map_err(|_| D::Error::custom(format!("{n} is out of range")))
    }

    pub fn option_u8<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u8>, D::Error> {
        match option_i64(deserializer)? {
            Some(n) => u8::try_from(n)
                .map(Some)
                .map_err(|_| D::Error::custom(format!("{n} is out of range"))),
            None => Ok(None),
        }
    }
}
