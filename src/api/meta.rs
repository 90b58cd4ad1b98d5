//! `GET /`, `GET /openapi.json`, and `GET /metrics` (on the private
//! metrics listener only).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa::ToSchema;

use super::Api;
use crate::metrics::Gauges;

#[derive(Serialize, ToSchema)]
pub struct ServiceInfo {
    name: &'static str,
    version: &'static str,
    status: &'static str,
    /// `production` for release builds, `development` otherwise.
    env: &'static str,
}

/// Service name and version (the seeds' health check shape).
#[utoipa::path(get, path = "/", tag = "meta",
    responses((status = 200, body = ServiceInfo)))]
pub(super) async fn root() -> Json<ServiceInfo> {
    Json(ServiceInfo {
        name: "keepd",
        version: env!("CARGO_PKG_VERSION"),
        status: "ok",
        env: if cfg!(debug_assertions) {
            "development"
        } else {
            "production"
        },
    })
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "meta",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json")))]
pub(super) async fn openapi_json(State(api): State<Arc<Api>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        api.openapi.get().cloned().unwrap_or_default(),
    )
}

/// Prometheus metrics (text format 0.0.4).
pub(super) async fn metrics(State(api): State<Arc<Api>>) -> impl IntoResponse {
    let (pool_max, pool_open, pool_idle, pool_waiting) = api.pool.occupancy();
    let text = api.metrics.render(&Gauges {
        pool_max,
        pool_open,
        pool_idle,
        pool_waiting,
        postgres_up: api.health.postgres_ready(),
    });
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}
