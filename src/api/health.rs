//! `GET /health`: 200 only while Postgres answers a query through the pool
//! (as the node's login role), 503 otherwise; and what a node answers on
//! every route while it waits to be admitted to its cluster.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tokio::sync::watch;
use utoipa::ToSchema;

use super::Api;
use super::error::ApiError;
use crate::postgres::pool::{GroupRole, OperationContext, RoleAwarePool};
use crate::postgres::supervise::PgState;

pub struct HealthProbe {
    state: watch::Receiver<PgState>,
    pool: RoleAwarePool,
}

const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

impl HealthProbe {
    pub fn new(state: watch::Receiver<PgState>, pool: RoleAwarePool) -> HealthProbe {
        HealthProbe { state, pool }
    }

    pub fn postgres_ready(&self) -> bool {
        *self.state.borrow() == PgState::Ready
    }

    /// The supervisor's view when Postgres is not up, else a live query.
    async fn check(&self) -> Result<(), &'static str> {
        let state = *self.state.borrow();
        if state != PgState::Ready {
            return Err(state.as_str());
        }
        let attempt = async {
            let tx = self
                .pool
                .begin(&OperationContext::system(GroupRole::Readonly))
                .await?;
            tx.query_one("SELECT 1", &[]).await?;
            tx.commit().await
        };
        match tokio::time::timeout(PROBE_TIMEOUT, attempt).await {
            Ok(Ok(())) => Ok(()),
            _ => Err("unreachable"),
        }
    }
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HealthBody {
    /// `ok` or `unavailable`.
    status: &'static str,
    /// `up`, or the supervisor's state (`starting`, `restarting`, ...).
    postgres: &'static str,
    node_id: String,
    version: &'static str,
    /// Why the node does not serve, when that is not Postgres.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
}

/// Liveness of keepd and its Postgres.
#[utoipa::path(get, path = "/health", tag = "meta",
    responses(
        (status = 200, description = "Postgres answers", body = HealthBody),
        (status = 503, description = "Postgres is down or restarting", body = HealthBody),
    ))]
pub(super) async fn health(State(api): State<Arc<Api>>) -> (StatusCode, Json<HealthBody>) {
    let (status, body_status, postgres) = match api.health.check().await {
        Ok(()) => (StatusCode::OK, "ok", "up"),
        Err(postgres) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable", postgres),
    };
    let body = HealthBody {
        status: body_status,
        postgres,
        node_id: api.node_id.clone(),
        version: env!("CARGO_PKG_VERSION"),
        reason: None,
    };
    (status, Json(body))
}

const NOT_ADMITTED: &str = "this node is not admitted to its cluster yet: on an admitted node, \
     compare `keepd cluster pending` with this node's fingerprint and run `keepd cluster admit`";

/// Every route of a node waiting to be admitted: `/health` 503 with the
/// reason, anything else 503 `not_admitted` with Retry-After. Nothing is
/// read or written: the node holds no key to serve with.
pub fn pending_router(node_id: String) -> Router {
    let health = move || {
        let body = HealthBody {
            status: "pending",
            postgres: "up",
            node_id: node_id.clone(),
            version: env!("CARGO_PKG_VERSION"),
            reason: Some(NOT_ADMITTED),
        };
        async move { (StatusCode::SERVICE_UNAVAILABLE, Json(body)) }
    };
    Router::new()
        .route("/health", get(health))
        .fallback(|| async { ApiError::not_admitted(NOT_ADMITTED) })
}
