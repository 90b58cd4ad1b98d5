//! `GET /health`: 200 only while Postgres answers a query through the pool
//! (as the node's login role), 503 otherwise.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};
use tokio::sync::watch;

use super::ApiState;
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

pub(super) async fn health(State(api): State<ApiState>) -> (StatusCode, Json<Value>) {
    let (status, body) = match api.health.check().await {
        Ok(()) => (StatusCode::OK, json!({"status": "ok", "postgres": "up"})),
        Err(postgres) => (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "unavailable", "postgres": postgres}),
        ),
    };
    let mut body = body;
    body["nodeId"] = json!(api.node_id);
    body["version"] = json!(env!("CARGO_PKG_VERSION"));
    (status, Json(body))
}
