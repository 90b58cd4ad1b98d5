//! The HTTP API: the zero-knowledge sync routes, health and the OpenAPI
//! document generated from the handlers; the private metrics router; the
//! layers every response passes (CORS, security headers, body and request
//! deadlines). Connections are the edge's (`crate::edge`).
//!
//! Every handler that touches data runs in a transaction of the
//! role-aware pool as the group role its work needs and, for tenant data,
//! as the caller (`UserAuth`), so row-level security holds even where a
//! query forgot its `WHERE`. Every write and every login attempt appends
//! an audit entry in the same transaction; identifiers in audit entries
//! are keyed HMACs.

mod announcer;
mod auth;
mod devices;
mod error;
pub mod events;
mod extract;
mod health;
mod limits;
mod meta;
mod opaque;
pub mod operator;
mod second_factor;
mod store;
mod sync;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequestParts, MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use tokio::sync::watch;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::set_header::SetResponseHeaderLayer;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;
use zeroize::Zeroizing;

pub use error::{ApiError, ErrorBody};
use extract::ClientAddr;
pub use health::{HealthProbe, pending_router};

use crate::audit::{self, AuditAction, AuditEntry, AuditIdentifiers};
use crate::cluster::{ClusterKey, Purpose};
use crate::config::{QuotasConfig, RateLimitsConfig, Registration};
use crate::edge::TrustedProxies;
use crate::field_crypto::FieldCipher;
use crate::identity::NodeIdentity;
use crate::metrics::Metrics;
use crate::passwords::{PasswordError, PasswordHasher};
use crate::postgres::pool::{RoleAwarePool, ScopedTransaction};
use crate::postgres::supervise::PgState;
use crate::tokens::TokenIssuer;

/// The API's limits and whom it believes about client addresses, from
/// `api.*`.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    pub jwt_ttl: Duration,
    pub max_body_bytes: usize,
    pub max_push_entries: usize,
    pub max_entry_bytes: usize,
    pub max_pull_bytes: usize,
    pub rate_limits: RateLimitsConfig,
    pub quotas: QuotasConfig,
    /// What `POST /backups` accepts (`api.backups`).
    pub backups: crate::config::ApiBackupsConfig,
    pub registration: Registration,
    /// `api.auth`: whether the password routes answer.
    pub auth: crate::config::ApiAuthConfig,
    pub request_timeout: Duration,
    /// A request body must arrive within this (408 beyond).
    pub body_timeout: Duration,
    /// Peers whose forwarding headers name the client.
    pub trusted_proxies: TrustedProxies,
    /// How long an Idempotency-Key names its first request.
    pub idempotency_ttl: Duration,
    pub events: crate::config::EventsConfig,
    /// How addresses are grouped into clients for per-client limits.
    pub prefixes: crate::edge::ClientPrefixes,
}

impl ApiSettings {
    /// The API's settings from its section, `api`, and the one reading of
    /// `api.trusted_proxies` the edge shares.
    pub fn new(api: &crate::config::ApiConfig, trusted_proxies: TrustedProxies) -> ApiSettings {
        ApiSettings {
            jwt_ttl: api.jwt_ttl.get(),
            max_body_bytes: api.max_body_bytes,
            max_push_entries: api.max_push_entries,
            max_entry_bytes: api.max_entry_bytes,
            max_pull_bytes: api.max_pull_bytes,
            rate_limits: api.rate_limits.clone(),
            quotas: api.quotas.clone(),
            backups: api.backups.clone(),
            registration: api.registration,
            auth: api.auth.clone(),
            request_timeout: api.request_timeout.get(),
            body_timeout: api.body_timeout.get(),
            trusted_proxies,
            idempotency_ttl: api.idempotency_ttl.get(),
            events: api.events.clone(),
            prefixes: crate::edge::ClientPrefixes::new(api.client_prefix_v4, api.client_prefix_v6),
        }
    }
}

/// What browsers are told, from `api.*`.
#[derive(Debug, Clone, Default)]
pub struct WebPolicy {
    /// Exact origins allowed by CORS; empty = none.
    pub cors_origins: Vec<String>,
    /// The API is served over TLS: send `Strict-Transport-Security`.
    pub hsts: bool,
}

/// What every handler can reach.
pub struct Api {
    pool: RoleAwarePool,
    /// What changes with the cluster root (`rekey`).
    root: RwLock<Arc<RootKeys>>,
    passwords: PasswordHasher,
    /// Carried across root rotations (`ClusterKey::rotated`).
    email_key: Zeroizing<[u8; 32]>,
    /// OPAQUE's server side, the cluster's setup; carried like the email key.
    opaque: crate::opaque::OpaqueServer,
    node_id: String,
    settings: ApiSettings,
    limits: limits::Limits,
    /// Routes the OpenAPI document declares without security: counted
    /// per client address.
    public_routes: OnceLock<HashMap<String, Vec<Method>>>,
    metrics: Arc<Metrics>,
    health: HealthProbe,
    fields: Arc<FieldCipher>,
    openapi: OnceLock<String>,
    /// Live-update streams and their fan-out (`events::listen` feeds it).
    pub events: Arc<events::Events>,
    /// Where committed pushes leave their live events.
    announcer: announcer::Announcer,
}

/// The keys a cluster root rotation replaces.
struct RootKeys {
    tokens: TokenIssuer,
    identifiers: AuditIdentifiers,
}

impl RootKeys {
    fn of(cluster: &ClusterKey, node_id: &str, ttl: std::time::Duration) -> RootKeys {
        RootKeys {
            tokens: TokenIssuer::new(cluster, node_id, ttl),
            identifiers: AuditIdentifiers::new(cluster),
        }
    }
}

impl Api {
    pub fn new(
        identity: &NodeIdentity,
        pool: RoleAwarePool,
        postgres: watch::Receiver<PgState>,
        cluster: &ClusterKey,
        metrics: Arc<Metrics>,
        settings: ApiSettings,
        fields: Arc<FieldCipher>,
    ) -> Result<Api, PasswordError> {
        Ok(Api {
            root: RwLock::new(Arc::new(RootKeys::of(
                cluster,
                identity.node_id().as_str(),
                settings.jwt_ttl,
            ))),
            passwords: PasswordHasher::new()?,
            email_key: cluster.derive(Purpose::EmailHmac),
            opaque: crate::opaque::OpaqueServer::new(cluster),
            node_id: identity.node_id().to_string(),
            limits: limits::Limits::new(&settings.rate_limits, settings.prefixes),
            public_routes: OnceLock::new(),
            events: Arc::new(events::Events::new(events::StreamCaps {
                max: settings.events.max_streams as usize,
                per_account: settings.events.max_streams_per_account as usize,
                per_client: settings.events.max_streams_per_client as usize,
                max_idle: settings.events.max_idle.get(),
            })),
            settings,
            health: HealthProbe::new(postgres, pool.clone()),
            announcer: announcer::Announcer::start(pool.clone()),
            pool,
            metrics,
            fields,
            openapi: OnceLock::new(),
        })
    }

    /// The cluster's new root (`keepd cluster rotate-key`): tokens are
    /// issued under it (the previous root's pass until they expire), audit
    /// identifiers continue under it, and field keys of its versions are
    /// derived from it. The email HMAC key and the OPAQUE setup are
    /// carried by the rotation and do not change.
    pub fn rekey(&self, cluster: &ClusterKey) {
        let keys = Arc::new(RootKeys::of(cluster, &self.node_id, self.settings.jwt_ttl));
        *self.root.write().expect("not poisoned") = keys;
        self.fields.rekey(cluster);
    }

    /// Sends the live events of committed pushes still pending and stops
    /// sending: for the daemon, once the API has stopped serving and
    /// before Postgres stops.
    pub async fn close_announcer(&self) {
        self.announcer.close().await;
    }

    /// Whether tokens are still issued under the previous root.
    pub fn issues_under_previous_root(&self) -> bool {
        self.root_keys().tokens.issues_under_previous()
    }

    /// Every live node holds the current root: issue tokens under it.
    pub fn issue_under_current_root(&self) {
        self.root_keys().tokens.issue_under_current();
    }

    fn root_keys(&self) -> Arc<RootKeys> {
        self.root.read().expect("not poisoned").clone()
    }

    /// How many live nodes share the per-account rate budget.
    pub fn set_cluster_nodes(&self, nodes: u32) {
        self.limits.set_nodes(nodes);
    }

    /// Applies new `api.rate_limits` (SIGHUP); counting starts afresh.
    pub fn set_rate_limits(&self, rate_limits: &RateLimitsConfig) {
        self.limits.reconfigure(rate_limits);
    }

    /// The stored form of an email: a keyed HMAC of its normalised form.
    fn email_hmac(&self, normalised: &str) -> Vec<u8> {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(self.email_key.as_ref())
            .expect("any key length");
        mac.update(normalised.as_bytes());
        mac.finalize().into_bytes().to_vec()
    }

    /// 413 `quota_exceeded` when what `tx` wrote takes the account past
    /// `api.quotas` (the transaction is then dropped: nothing is stored).
    async fn check_quotas(&self, tx: &ScopedTransaction, user: Uuid) -> Result<(), ApiError> {
        self.within_quotas(&store::usage::of(tx, user).await?)
    }

    /// 413 `quota_exceeded` when `usage` is past one of `api.quotas`.
    fn within_quotas(&self, usage: &store::usage::Usage) -> Result<(), ApiError> {
        match usage.exceeds(&store::usage::Usage::from(&self.settings.quotas)) {
            Some(exceeded) => Err(ApiError::quota_exceeded(exceeded)),
            None => Ok(()),
        }
    }

    /// A user as audit entries name it.
    fn user_ref(&self, user: Uuid) -> String {
        self.root_keys()
            .identifiers
            .identifier("user", &user.to_string())
    }

    /// Appends the audit entry of a change made in `tx`.
    async fn audit(
        &self,
        tx: &mut ScopedTransaction,
        action: AuditAction,
        rows_affected: i64,
        started: Instant,
        metadata: serde_json::Value,
    ) -> Result<(), ApiError> {
        let entry = AuditEntry {
            action,
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
        .routes(routes!(auth::register))
        .routes(routes!(auth::login))
        .routes(routes!(auth::logout))
        .routes(routes!(auth::change_password))
        .routes(routes!(auth::account, auth::delete_account))
        .routes(routes!(opaque::register_start))
        .routes(routes!(opaque::register_finish))
        .routes(routes!(opaque::login_start))
        .routes(routes!(opaque::login_finish))
        .routes(routes!(opaque::upgrade))
        .routes(routes!(opaque::change_password))
        .routes(routes!(second_factor::enrol, second_factor::disable))
        .routes(routes!(second_factor::confirm))
        .routes(routes!(sync::store_vault_key))
        .routes(routes!(sync::vault_key, sync::rewrap_vault_key))
        .routes(routes!(sync::list_vaults))
        .routes(routes!(sync::events))
        .routes(routes!(sync::delete_vault))
        .routes(routes!(sync::push))
        .routes(routes!(sync::pull))
        .routes(routes!(devices::register_device, devices::list_devices))
        .routes(routes!(devices::revoke_device))
        .routes(routes!(devices::store_backup, devices::list_backups))
        .routes(routes!(devices::backup, devices::delete_backup))
}

/// The router and its OpenAPI document, completed with what every route
/// can answer.
fn parts() -> (Router<Arc<Api>>, utoipa::openapi::OpenApi) {
    let (router, mut openapi) = routes().split_for_parts();
    complete(&mut openapi);
    (router, openapi)
}

/// The answers the layers in front of every handler give, stated on
/// every operation they can reach, so the document holds every status a
/// generated client may meet: 429 and 503 everywhere (rate limits, a
/// database that is away, `api.request_timeout`, a node not admitted),
/// 400 where a path or query is parsed, and 400 / 408 / 413 / 415 where a
/// JSON body is read.
fn complete(openapi: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    let error = |description: &str| {
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
            .build()
    };
    for item in openapi.paths.paths.values_mut() {
        let operations = [
            item.get.as_mut(),
            item.post.as_mut(),
            item.put.as_mut(),
            item.patch.as_mut(),
            item.delete.as_mut(),
        ];
        for operation in operations.into_iter().flatten() {
            let mut common = vec![
                ("429", "Too many requests (`rate_limited`, `Retry-After`)"),
                (
                    "503",
                    "Nothing was done; retry after `Retry-After` (`database_unavailable`, \
                     `not_admitted`)",
                ),
            ];
            if operation.parameters.as_ref().is_some_and(|p| !p.is_empty()) {
                common.push(("400", "A path or query parameter is malformed"));
            }
            if operation.request_body.is_some() {
                common.extend([
                    ("400", "The body is not the JSON this route takes"),
                    ("408", "The body did not arrive within `api.body_timeout`"),
                    ("413", "The body is larger than `api.max_body_bytes`"),
                    ("415", "The body is not `application/json`"),
                ]);
            }
            let responses = &mut operation.responses.responses;
            for (status, description) in common {
                responses
                    .entry(status.to_string())
                    .or_insert_with(|| error(description).into());
            }
        }
    }
    link_created_to_readers(openapi);
}

/// Links from the operations that create a vault, a device or a backup to
/// those that read, change or remove it, so a generated client (and
/// schemathesis's stateful phase) can follow them.
fn link_created_to_readers(openapi: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::RefOr;
    use utoipa::openapi::link::LinkBuilder;
    const VAULT: &str = "$request.body#/vaultId";
    let links: [(&str, &str, &str, &str, &str); 6] = [
        ("/sync/vault-key", "201", "vault_key", "vaultId", VAULT),
        (
            "/sync/vault-key",
            "201",
            "rewrap_vault_key",
            "vaultId",
            VAULT,
        ),
        ("/sync/vault-key", "201", "events", "vaultId", VAULT),
        ("/sync/vault-key", "201", "delete_vault", "vaultId", VAULT),
        (
            "/devices",
            "201",
            "revoke_device",
            "id",
            "$response.body#/device/id",
        ),
        (
            "/backups",
            "201",
            "backup",
            "id",
            "$response.body#/backup/id",
        ),
    ];
    for (path, status, target, parameter, expression) in links {
        let Some(operation) = openapi
            .paths
            .paths
            .get_mut(path)
            .and_then(|item| item.post.as_mut())
        else {
            continue;
        };
        if let Some(RefOr::T(response)) = operation.responses.responses.get_mut(status) {
            let link = LinkBuilder::new()
                .operation_id(target)
                .parameter(parameter, expression)
                .build();
            response.links.insert(target.to_string(), link.into());
        }
    }
}

/// The OpenAPI document as served at `/openapi.json`.
pub fn openapi_document() -> String {
    parts()
        .1
        .to_pretty_json()
        .expect("the OpenAPI document serialises")
}

/// The routes whose answers are long-lived streams (`text/event-stream`):
/// the edge answers them outside hyper when they open a connection, so
/// each open stream costs little memory (`edge::streams`).
pub const STREAM_PATHS: &[&str] = &["/sync/events"];

/// The public router: every route of the OpenAPI document, behind the
/// layers every answer passes.
pub fn router(api: Arc<Api>, web: &WebPolicy) -> Router {
    let (router, openapi) = parts();
    let _ = api.public_routes.set(public_routes(&openapi));
    let _ = api.openapi.set(
        openapi
            .to_pretty_json()
            .expect("the OpenAPI document serialises"),
    );
    let mut router = router
        .route_layer(middleware::from_fn_with_state(api.clone(), limit_public))
        .route_layer(middleware::from_fn_with_state(api.clone(), track))
        .fallback(
            |State(api): State<Arc<Api>>, client: ClientAddr| async move {
                api.limits
                    .address(client.0)
                    .map_err(ApiError::rate_limited)?;
                Err::<(), _>(ApiError::not_found(
                    "no_such_route",
                    "no route matches this path; see /openapi.json",
                ))
            },
        )
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not take that method; see /openapi.json",
            )
        })
        .layer(middleware::from_fn_with_state(api.clone(), deadline))
        // Outside `deadline`: a slow body is the client's, not the database's.
        .layer(middleware::from_fn_with_state(api.clone(), read_body))
        .layer(DefaultBodyLimit::max(api.settings.max_body_bytes));
    if !web.cors_origins.is_empty() {
        router = router.layer(cors(&web.cors_origins));
    }
    // Nothing keepd answers is for a cache: tokens, ciphertext, keys.
    router = router
        .layer(SetResponseHeaderLayer::overriding(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ));
    if web.hsts {
        router = router.layer(SetResponseHeaderLayer::overriding(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=31536000"),
        ));
    }
    router
        .layer(middleware::from_fn_with_state(api.clone(), count_response))
        .with_state(api)
}

/// CORS for exactly `origins`: the methods and headers keepd's clients
/// use, `Retry-After` readable, no credentials (tokens travel in
/// `Authorization`, never in cookies), so never a wildcard.
fn cors(origins: &[String]) -> CorsLayer {
    let origins = origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect::<Vec<_>>();
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_methods([Method::GET, Method::POST, Method::PATCH, Method::DELETE])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("idempotency-key"),
        ])
        .expose_headers([header::RETRY_AFTER])
        .max_age(Duration::from_secs(600))
}

/// The private listener's router (`api.metrics_listen`): `/metrics` only.
pub fn metrics_router(api: Arc<Api>) -> Router {
    Router::new()
        .route("/metrics", axum::routing::get(meta::metrics))
        .with_state(api)
}

/// The operations the OpenAPI document declares without a security
/// requirement, by path: the routes anyone may call.
fn public_routes(openapi: &utoipa::openapi::OpenApi) -> HashMap<String, Vec<Method>> {
    let mut public: HashMap<String, Vec<Method>> = HashMap::new();
    for (path, item) in &openapi.paths.paths {
        for (method, operation) in [
            (Method::GET, &item.get),
            (Method::POST, &item.post),
            (Method::PUT, &item.put),
            (Method::PATCH, &item.patch),
            (Method::DELETE, &item.delete),
        ] {
            if operation.as_ref().is_some_and(|op| op.security.is_none()) {
                public.entry(path.clone()).or_default().push(method);
            }
        }
    }
    public
}

/// Counts a request to a public route against its client address
/// (`api.rate_limits.address_per_second`); authenticated routes are
/// counted per account by `UserAuth`.
async fn limit_public(State(api): State<Arc<Api>>, request: Request, next: Next) -> Response {
    let public = request
        .extensions()
        .get::<MatchedPath>()
        .zip(api.public_routes.get())
        .and_then(|(route, routes)| routes.get(route.as_str()))
        .is_some_and(|methods| methods.contains(request.method()));
    if !public {
        return next.run(request).await;
    }
    let (mut parts, body) = request.into_parts();
    let client = match ClientAddr::from_request_parts(&mut parts, &api).await {
        Ok(ClientAddr(client)) => client,
        Err(e) => return e.into_response(),
    };
    if let Err(limited) = api.limits.address(client) {
        return ApiError::rate_limited(limited).into_response();
    }
    next.run(Request::from_parts(parts, body)).await
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

/// Counts every answer by status class, unrouted ones included.
async fn count_response(State(api): State<Arc<Api>>, request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    api.metrics.observe_response(response.status().as_u16());
    response
}

/// Reads the whole body within `api.body_timeout` (408 past it) before
/// the handler runs, so a client trickling its body ties up no database
/// connection and is never mistaken for a database outage.
async fn read_body(State(api): State<Arc<Api>>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let limit = api.settings.max_body_bytes;
    let read = tokio::time::timeout(api.settings.body_timeout, axum::body::to_bytes(body, limit));
    match read.await {
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
                .await
        }
        Ok(Err(e)) if is_length_limit(&e) => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "the request body exceeds api.max_body_bytes; send less per request",
        )
        .into_response(),
        Ok(Err(e)) => ApiError::bad_request(
            "unreadable_body",
            format!("the request body could not be read: {e}"),
        )
        .into_response(),
        Err(_) => {
            let mut response = ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                "the request body did not arrive within api.body_timeout; send it at once",
            )
            .into_response();
            // The rest of the body may still be coming: do not read it.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            response
        }
    }
}

fn is_length_limit(error: &axum::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = cause {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cause = e.source();
    }
    false
}

/// Answers 503 instead of hanging when a request outlives
/// `api.request_timeout` (a stalled database). The handler is dropped; its
/// transaction is rolled back as soon as the database answers again.
async fn deadline(State(api): State<Arc<Api>>, request: Request, next: Next) -> Response {
    match tokio::time::timeout(api.settings.request_timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::unavailable("the request outlived api.request_timeout").into_response(),
    }
}

/// Parses `bytes` as every request body type, as the routes do (for the
/// fuzz targets in `fuzz/`: a body that parses must not panic either).
#[doc(hidden)]
pub fn parse_request_bodies(bytes: &[u8]) -> usize {
    fn parses<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> usize {
        usize::from(serde_json::from_slice::<T>(bytes).is_ok())
    }
    parses::<auth::CredentialsBody>(bytes)
        + parses::<auth::RegisterBody>(bytes)
        + parses::<auth::ChangePasswordBody>(bytes)
        + parses::<auth::DeleteAccountBody>(bytes)
        + parses::<sync::StoreVaultKeyBody>(bytes)
        + parses::<sync::PushBody>(bytes)
        + parses::<sync::PullBody>(bytes)
        + parses::<devices::RegisterDeviceBody>(bytes)
        + parses::<devices::StoreBackupBody>(bytes)
}

/// RFC 3339 in UTC with milliseconds, as the seeds' clients expect
/// (`2025-01-01T00:00:00.000Z`; the fraction truncated, not rounded). A
/// moment before 1970 reads as 1970, one after 9999 as its last
/// millisecond.
fn iso8601(t: SystemTime) -> String {
    use time::macros::format_description;
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let moment = time::Duration::try_from(since)
        .ok()
        .and_then(|since| time::OffsetDateTime::UNIX_EPOCH.checked_add(since))
        .unwrap_or(time::PrimitiveDateTime::MAX.assume_utc());
    moment
        .format(format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
        ))
        .unwrap_or_default()
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
        let late = UNIX_EPOCH + Duration::from_nanos(1_735_689_599_999_999_999);
        assert_eq!(iso8601(late), "2024-12-31T23:59:59.999Z");
        assert_eq!(
            iso8601(UNIX_EPOCH - Duration::from_secs(1)),
            "1970-01-01T00:00:00.000Z"
        );
        let far = UNIX_EPOCH + Duration::from_secs(300_000_000_000);
        assert_eq!(iso8601(far), "9999-12-31T23:59:59.999Z");
    }

    #[test]
    fn the_stream_paths_are_the_routes_that_answer_event_streams() {
        let doc: serde_json::Value = serde_json::from_str(&openapi_document()).unwrap();
        let streaming: Vec<&str> = doc["paths"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(_, item)| {
                item.as_object().unwrap().values().any(|operation| {
                    operation["responses"]["200"]["content"]
                        .get("text/event-stream")
                        .is_some()
                })
            })
            .map(|(path, _)| path.as_str())
            .collect();
        assert_eq!(streaming, STREAM_PATHS);
    }

    #[test]
    fn openapi_describes_every_route() {
        let doc: serde_json::Value = serde_json::from_str(&openapi_document()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        for (path, method) in [
            ("/", "get"),
            ("/health", "get"),
            ("/openapi.json", "get"),
            ("/auth/register", "post"),
            ("/auth/login", "post"),
            ("/auth/logout", "post"),
            ("/auth/password", "post"),
            ("/account", "delete"),
            ("/account", "get"),
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
            ("/backups/{id}", "delete"),
        ] {
            assert!(
                paths.get(path).and_then(|p| p.get(method)).is_some(),
                "{method} {path} missing from the OpenAPI document"
            );
        }
        assert!(
            paths.get("/metrics").is_none(),
            "metrics are on their own listener, not the public API"
        );
    }
}
