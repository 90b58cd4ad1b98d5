//! The HTTP API: the zero-knowledge sync routes, health, metrics and the
//! OpenAPI document generated from the handlers.
//!
//! Every handler that touches data runs in a transaction of the
//! role-aware pool as the group role its work needs and, for tenant data,
//! as the caller (`UserAuth`), so row-level security holds even where a
//! query forgot its `WHERE`. Every write and every login attempt appends
//! an audit entry in the same transaction; identifiers in audit entries
//! are keyed HMACs.

mod auth;
mod devices;
mod error;
mod extract;
mod health;
mod limits;
mod meta;
mod queries;
mod sync;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use tokio::sync::watch;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;
use zeroize::Zeroizing;

pub use error::{ApiError, ErrorBody};
pub use health::HealthProbe;

use crate::audit::{self, AuditEntry, AuditKeys};
use crate::fields::FieldCipher;
use crate::identity::NodeIdentity;
use crate::metrics::Metrics;
use crate::passwords::{PasswordError, PasswordHasher};
use crate::postgres::pool::{RoleAwarePool, ScopedTransaction};
use crate::postgres::supervise::PgState;
use crate::shutdown::Shutdown;
use crate::tokens::TokenIssuer;

/// The API's limits, from `api.*`.
#[derive(Debug, Clone, Copy)]
pub struct ApiLimits {
    pub jwt_ttl: Duration,
    pub max_body_bytes: usize,
    pub max_push_entries: usize,
    pub auth_per_minute: u32,
    pub request_timeout: Duration,
}

/// What every handler can reach.
pub struct Api {
    pool: RoleAwarePool,
    tokens: TokenIssuer,
    passwords: PasswordHasher,
    email_key: Zeroizing<[u8; 32]>,
    audit_keys: Arc<AuditKeys>,
    node_id: String,
    limits: ApiLimits,
    auth_limiter: limits::RateLimiter,
    metrics: Arc<Metrics>,
    health: HealthProbe,
    fields: Arc<FieldCipher>,
    openapi: OnceLock<String>,
}

impl Api {
    pub fn new(
        identity: &NodeIdentity,
        pool: RoleAwarePool,
        postgres: watch::Receiver<PgState>,
        audit_keys: Arc<AuditKeys>,
        metrics: Arc<Metrics>,
        limits: ApiLimits,
        fields: Arc<FieldCipher>,
    ) -> Result<Api, PasswordError> {
        Ok(Api {
            tokens: TokenIssuer::new(identity, limits.jwt_ttl),
            passwords: PasswordHasher::new()?,
            email_key: identity.derive_key(b"keepd accounts", b"keepd email hmac v1"),
            audit_keys,
            node_id: identity.node_id().to_string(),
            auth_limiter: limits::RateLimiter::per_minute(limits.auth_per_minute),
            limits,
            health: HealthProbe::new(postgres, pool.clone()),
            pool,
            metrics,
            fields,
            openapi: OnceLock::new(),
        })
    }

    /// Applies a new `api.rate_limits.auth_per_minute` (SIGHUP).
    pub fn set_auth_per_minute(&self, per_minute: u32) {
        self.auth_limiter.set_per_minute(per_minute);
    }

    /// The stored form of an email: a keyed HMAC of its normalised form.
    fn email_hmac(&self, normalised: &str) -> Vec<u8> {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(self.email_key.as_ref())
            .expect("any key length");
        mac.update(normalised.as_bytes());
        mac.finalize().into_bytes().to_vec()
    }

    /// A user as audit entries name it.
    fn user_ref(&self, user: Uuid) -> String {
        self.audit_keys.identifier("user", &user.to_string())
    }

    /// Appends the audit entry of a change made in `tx`.
    async fn audit(
        &self,
        tx: &mut ScopedTransaction,
        action: &'static str,
        table_name: &'static str,
        rows_affected: i64,
        started: Instant,
        metadata: serde_json::Value,
    ) -> Result<(), ApiError> {
        let entry = AuditEntry {
            action,
            table_name,
            rows_affected,
            duration: started.elapsed(),
            source_component: "api",
            metadata,
        };
        Ok(audit::record(tx, &self.node_id, &entry).await?)
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "keepd",
        description = "Zero-knowledge sync: the server stores only ciphertext it cannot read."
    ),
    modifiers(&BearerScheme),
    components(schemas(ErrorBody))
)]
struct ApiDoc;

struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let scheme = HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .bearer_format("JWT")
            .build();
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme("bearer", SecurityScheme::Http(scheme));
    }
}

/// The routes and their OpenAPI document, from the same declarations.
fn routes() -> OpenApiRouter<Arc<Api>> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(meta::root))
        .routes(routes!(health::health))
        .routes(routes!(meta::openapi_json))
        .routes(routes!(meta::metrics))
        .routes(routes!(auth::register))
        .routes(routes!(auth::login))
        .routes(routes!(auth::logout))
        .routes(routes!(auth::change_password))
        .routes(routes!(auth::delete_account))
        .routes(routes!(sync::store_vault_key))
        .routes(routes!(sync::vault_key))
        .routes(routes!(sync::push))
        .routes(routes!(sync::pull))
        .routes(routes!(devices::register_device, devices::list_devices))
        .routes(routes!(devices::revoke_device))
        .routes(routes!(devices::store_backup, devices::list_backups))
        .routes(routes!(devices::backup))
}

/// The OpenAPI document as served at `/openapi.json`.
pub fn openapi_document() -> String {
    let (_, openapi) = routes().split_for_parts();
    openapi
        .to_pretty_json()
        .expect("the OpenAPI document serialises")
}

pub fn router(api: Arc<Api>) -> Router {
    let (router, openapi) = routes().split_for_parts();
    let _ = api.openapi.set(
        openapi
            .to_pretty_json()
            .expect("the OpenAPI document serialises"),
    );
    router
        .route_layer(middleware::from_fn_with_state(api.clone(), track))
        .fallback(|| async {
            ApiError::not_found(
                "no_such_route",
                "no route matches this path; see /openapi.json",
            )
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not take that method; see /openapi.json",
            )
        })
        .layer(middleware::from_fn_with_state(api.clone(), deadline))
        .layer(DefaultBodyLimit::max(api.limits.max_body_bytes))
        .with_state(api)
}

/// Counts and times every request by route template.
async fn track(State(api): State<Arc<Api>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().as_str().to_owned();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(String::new, |p| p.as_str().to_owned());
    let response = next.run(request).await;
    let (status, elapsed) = (response.status().as_u16(), started.elapsed());
    api.metrics
        .observe_request(&method, &route, status, elapsed);
    tracing::debug!(
        method,
        route,
        status,
        elapsed_us = elapsed.as_micros() as u64,
        "request"
    );
    response
}

/// Answers 503 instead of hanging when a request outlives
/// `api.request_timeout` (a stalled database). The handler is dropped; its
/// transaction is rolled back as soon as the database answers again.
async fn deadline(State(api): State<Arc<Api>>, request: Request, next: Next) -> Response {
    match tokio::time::timeout(api.limits.request_timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::unavailable("the request outlived api.request_timeout").into_response(),
    }
}

/// Serves `router` on `listener` until `stop`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    mut stop: Shutdown,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    // Without TCP_NODELAY a response written in several segments waits
    // for the client's delayed ACK (tens of milliseconds) before its tail.
    let listener = listener.tap_io(|stream| {
        let _ = stream.set_nodelay(true);
    });
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move { stop.requested().await })
    .await
}

/// Parses `bytes` as every request body type, as the routes do (for the
/// fuzz targets in `fuzz/`: a body that parses must not panic either).
#[doc(hidden)]
pub fn parse_request_bodies(bytes: &[u8]) -> usize {
    fn parses<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> usize {
        usize::from(serde_json::from_slice::<T>(bytes).is_ok())
    }
    parses::<auth::CredentialsBody>(bytes)
        + parses::<auth::ChangePasswordBody>(bytes)
        + parses::<sync::StoreVaultKeyBody>(bytes)
        + parses::<sync::PushBody>(bytes)
        + parses::<sync::PullBody>(bytes)
        + parses::<devices::RegisterDeviceBody>(bytes)
        + parses::<devices::StoreBackupBody>(bytes)
}

/// RFC 3339 in UTC with milliseconds, as the seeds' clients expect
/// (`2025-01-01T00:00:00.000Z`).
fn iso8601(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso8601_formats_utc_with_milliseconds() {
        assert_eq!(iso8601(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_735_689_600_123);
        assert_eq!(iso8601(t), "2025-01-01T00:00:00.123Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_825_599);
        assert_eq!(iso8601(leap), "2000-02-29T11:59:59.000Z");
    }

    #[test]
    fn openapi_describes_every_route() {
        let doc: serde_json::Value = serde_json::from_str(&openapi_document()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        for (path, method) in [
            ("/", "get"),
            ("/health", "get"),
            ("/openapi.json", "get"),
            ("/metrics", "get"),
            ("/auth/register", "post"),
            ("/auth/login", "post"),
            ("/auth/logout", "post"),
            ("/auth/password", "post"),
            ("/account", "delete"),
            ("/sync/vault-key", "post"),
            ("/sync/vault-key/{vaultId}", "get"),
            ("/sync/push", "post"),
            ("/sync/pull", "post"),
            ("/devices", "post"),
            ("/devices", "get"),
            ("/devices/{id}", "delete"),
            ("/backups", "post"),
            ("/backups", "get"),
            ("/backups/{id}", "get"),
        ] {
            assert!(
                paths.get(path).and_then(|p| p.get(method)).is_some(),
                "{method} {path} missing from the OpenAPI document"
            );
        }
    }
}
