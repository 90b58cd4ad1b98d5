//! `GET /health`: 200 only while Postgres answers a query, 503 otherwise.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};
use tokio::sync::{Mutex, watch};

use super::ApiState;
use crate::postgres::supervise::PgState;

/// Asks Postgres itself, over one reused connection, whether it answers.
pub struct HealthProbe {
    state: watch::Receiver<PgState>,
    config: tokio_postgres::Config,
    client: Mutex<Option<tokio_postgres::Client>>,
}

const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

impl HealthProbe {
    pub fn new(state: watch::Receiver<PgState>, config: tokio_postgres::Config) -> HealthProbe {
        HealthProbe {
            state,
            config,
            client: Mutex::new(None),
        }
    }

    /// The supervisor's view when Postgres is not up, else a live query.
    async fn check(&self) -> Result<(), &'static str> {
        let state = *self.state.borrow();
        if state != PgState::Ready {
            return Err(state.as_str());
        }
        let mut slot = self.client.lock().await;
        let attempt = async {
            if slot.as_ref().is_none_or(|c| c.is_closed()) {
                let (client, connection) = self.config.connect(tokio_postgres::NoTls).await?;
                tokio::spawn(connection);
                *slot = Some(client);
            }
            let client = slot.as_ref().expect("connected above");
            client.simple_query("SELECT 1").await.map(|_| ())
        };
        match tokio::time::timeout(PROBE_TIMEOUT, attempt).await {
            Ok(Ok(())) => Ok(()),
            _ => {
                // A broken or slow connection is replaced on the next probe.
                *slot = None;
                Err("unreachable")
            }
        }
    }
}

pub(super) async fn health(State(api): State<ApiState>) -> (StatusCode, Json<Value>) {
    match api.health.check().await {
        Ok(()) => (
            StatusCode::OK,
            Json(json!({
                "status": "ok",
                "postgres": "up",
                "nodeId": api.node_id,
                "version": env!("CARGO_PKG_VERSION"),
            })),
        ),
        Err(postgres) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "status": "unavailable",
                "postgres": postgres,
                "nodeId": api.node_id,
                "version": env!("CARGO_PKG_VERSION"),
            })),
        ),
    }
}
