//! `ApiError`: every failure a client sees, as
//! `{"error": {"code", "message"}}` with its status. Internal details
//! (SQL text, error chains) go to the log, never into a response.

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tracing::{error, warn};
use utoipa::ToSchema;

use super::limits::{Bucket, Limited};
use super::store::usage::Exceeded;
use crate::audit::AuditError;
use crate::passwords::PasswordError;
use crate::postgres::pool::PoolError;

/// How long a client should wait after a 503 before retrying.
const RETRY_AFTER_UNAVAILABLE: u64 = 1;

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<Duration>,
}

/// The error body every route answers with on failure.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable code (e.g. `vault_not_found`).
    code: String,
    /// What went wrong and how to fix it, for people.
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// What went wrong, for people.
    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, code, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn rate_limited(limited: Limited) -> ApiError {
        let message = match limited.bucket {
            Bucket::Authentication => {
                "too many authentication attempts from this address (api.rate_limits.auth_per_minute); \
                 retry after Retry-After seconds"
            }
            Bucket::Account => {
                "too many requests for this account (api.rate_limits.account_per_second); \
                 retry after Retry-After seconds"
            }
            Bucket::Address => {
                "too many requests from this address (api.rate_limits.address_per_second); \
                 retry after Retry-After seconds"
            }
            Bucket::Login => {
                "too many failed logins to this account from addresses it has not used; \
                 retry after Retry-After seconds"
            }
        };
        ApiError {
            retry_after: Some(limited.retry_after),
            ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message)
        }
    }

    /// A write would take the account past one of `api.quotas`.
    pub fn quota_exceeded(exceeded: Exceeded) -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "quota_exceeded",
            format!(
                "this would bring the account to {} where {} allows {}; nothing was stored \
                 (GET /account shows usage and quotas)",
                exceeded.would_be, exceeded.quota, exceeded.limit
            ),
        )
    }

    /// This node cannot serve yet (it waits to be admitted to its
    /// cluster): another node may, or this one shortly.
    pub fn not_admitted(message: &'static str) -> ApiError {
        ApiError {
            retry_after: Some(Duration::from_secs(RETRY_AFTER_UNAVAILABLE)),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_admitted", message)
        }
    }

    /// The node holds as many unread response bytes as its budget allows
    /// (`edge::budget`): the client may retry in a second.
    pub fn response_budget(exhausted: crate::edge::Exhausted) -> ApiError {
        ApiError {
            retry_after: Some(Duration::from_secs(1)),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "response_budget_exhausted",
                format!(
                    "answers not yet read by their clients fill {}; retry shortly (a client \
                     holding answers it does not read waits for its own first)",
                    exhausted.setting()
                ),
            )
        }
    }

    /// Nothing was stored, and the same request sent again will be: 503
    /// with `Retry-After`, as for a database that is briefly unavailable.
    pub fn retry(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            retry_after: Some(Duration::from_secs(RETRY_AFTER_UNAVAILABLE)),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
        }
    }

    /// The database is unreachable or saturated: the client may retry.
    pub fn unavailable(reason: &str) -> ApiError {
        warn!(reason, "request refused: database unavailable");
        ApiError {
            retry_after: Some(Duration::from_secs(RETRY_AFTER_UNAVAILABLE)),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "database_unavailable",
                "the database is unavailable right now; nothing was stored, retry shortly",
            )
        }
    }

    /// A fault of keepd's: logged in full, answered without detail.
    pub fn internal(context: &str, detail: &dyn std::fmt::Display) -> ApiError {
        error!(context, error = %detail, "request failed");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "keepd could not complete the request; the operator's log has the reason",
        )
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn code(&self) -> &'static str {
        self.code
    }
}

impl From<PoolError> for ApiError {
    fn from(e: PoolError) -> ApiError {
        match &e {
            PoolError::Timeout(_) | PoolError::Connect(_) => ApiError::unavailable(&e.to_string()),
            // The connection failed (closed, or an I/O error on it): the
            // database may be back in a moment. Other errors without a
            // server answer (a parameter or column of the wrong type) are
            // keepd's own faults, below.
            PoolError::Sql(inner)
                if inner.is_closed()
                    || std::error::Error::source(inner)
                        .is_some_and(|source| source.is::<std::io::Error>()) =>
            {
                ApiError::unavailable(&e.to_string())
            }
            PoolError::Sql(inner) => match inner.code().map(|c| c.code()) {
                // Shutdown, crash recovery, too many connections, statement
                // or lock timeout: transient, the client may retry.
                Some(code)
                    if code.starts_with("57P")
                        || code.starts_with("53")
                        || code == "57014"
                        || code == "55P03"
                        || code == "40001"
                        || code == "40P01"
                        // A standby after a failover: the pool drops the
                        // connection and finds the new primary.
                        || code == "25006" =>
                {
                    ApiError::unavailable(&e.to_string())
                }
                _ => ApiError::internal("database", &e),
            },
        }
    }
}

impl From<AuditError> for ApiError {
    fn from(e: AuditError) -> ApiError {
        match e {
            AuditError::Pool(e) => e.into(),
            other => ApiError::internal("audit", &other),
        }
    }
}

impl From<super::store::StoreError> for ApiError {
    fn from(e: super::store::StoreError) -> ApiError {
        use super::store::StoreError;
        match e {
            StoreError::Pool(e) => e.into(),
            StoreError::Field(e) => e.into(),
            other
            @ (StoreError::Random(_) | StoreError::Encode(_) | StoreError::Interrupted(_)) => {
                ApiError::internal("store", &other)
            }
        }
    }
}

impl From<crate::field_crypto::FieldError> for ApiError {
    fn from(e: crate::field_crypto::FieldError) -> ApiError {
        error!(error = %e, "a stored value cannot be decrypted");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "stored_value_unreadable",
            "a stored value cannot be decrypted with this node's field keys; the operator's log names it",
        )
    }
}

impl From<PasswordError> for ApiError {
    fn from(e: PasswordError) -> ApiError {
        ApiError::internal("password hashing", &e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(after) = self.retry_after {
            // Whole seconds, rounded up: retrying earlier would be refused.
            let seconds = (after.as_secs() + u64::from(after.subsec_nanos() > 0)).max(1);
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_str(&seconds.to_string()).expect("digits are a valid header"),
            );
        }
        response
    }
}
