//! The HTTP API. Only `/health` exists so far.

mod health;

use std::sync::Arc;

use axum::Router;
use axum::routing::get;

pub use health::HealthProbe;

/// What every handler can reach.
#[derive(Clone)]
pub struct ApiState {
    pub health: Arc<HealthProbe>,
    pub node_id: String,
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/health", get(health::health))
        .with_state(state)
}
