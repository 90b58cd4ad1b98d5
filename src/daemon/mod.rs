//! `keepd run`: wires the modules together in the one direction data flows
//! (config → render → provision → roles → pool → api) and handles signals.

pub mod control;
pub mod notify;
pub mod reencrypt;
pub mod reload;
pub mod renewal;
pub mod rotator;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Notify;
use tracing::{error, info, warn};

use crate::api::{self, Api, ApiSettings, WebPolicy};
use crate::audit::{self, AuditKeys, AuditSealer};
use crate::config::{Config, FallbackMode, Layout, LogFormat, Topology};
use crate::edge::{self, ApiCertificate, ApiTlsError, EdgeError, EdgeSettings, TrustedProxies};
use crate::field_crypto::FieldCipher;
use crate::identity::{IdentityError, NodeIdentity};
use crate::metrics::Metrics;
use crate::passwords::PasswordError;
use crate::postgres::bootstrap::{self, BootstrapError};
use crate::postgres::migrate::{self, MigrateError};
use crate::postgres::pool::{PoolSettings, RoleAwarePool};
use crate::postgres::render::{self, RenderError};
use crate::postgres::server::{Prepared, ProviderError, Server};
use crate::postgres::supervise::Supervisor;
use crate::postgres::{DATABASE, describe_error};
use crate::report::measure::{Inputs, measure};
use crate::report::{Check, Report, Status};
use crate::secrets::store::{CredentialStore, Credentials, StoreError};
use crate::secrets::values::{EntropyError, ScramVerifier};
use crate::shutdown;
use crate::state_lock::{StateError, StateLock};
use rotator::{PgAccess, RotationError, RotationSettings, Rotator};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Render(#[from] RenderError),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error(transparent)]
    Bootstrap(#[from] BootstrapError),
    #[error(transparent)]
    Rotation(#[from] RotationError),
    #[error(transparent)]
    Migrate(#[from] MigrateError),
    #[error("cannot connect to Postgres as the superuser: {}", describe_error(.0))]
    Connect(#[source] tokio_postgres::Error),
    #[error(transparent)]
    Entropy(#[from] EntropyError),
    #[error(
        "the sealed credentials {path} are missing but the cluster in {data_dir} exists; keepd \
         will not reset them: restore db.enc from the backup taken with identity.key"
    )]
    CredentialsMissing { path: PathBuf, data_dir: PathBuf },
    #[error(
        "Postgres did not accept connections within {seconds}s; its log: {logs}; \
         {key} sets the limit"
    )]
    StartTimeout {
        seconds: u64,
        logs: String,
        key: &'static str,
    },
    #[error("cannot listen on {what} {addr}: {source}")]
    Listen {
        what: &'static str,
        addr: String,
        source: std::io::Error,
    },
    #[error(
        "security.fallback_mode is strict and these requirements are unmet: {0}; fix them, or \
         choose fallback_mode warn"
    )]
    Security(String),
    #[error("cannot create {path}: {source}")]
    Directory {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("the API server failed: {0}")]
    Serve(std::io::Error),
    #[error(transparent)]
    Passwords(#[from] PasswordError),
    #[error(transparent)]
    ApiTls(#[from] ApiTlsError),
    #[error(transparent)]
    Edge(#[from] EdgeError),
    #[error("a startup task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl DaemonError {
    /// A setting that cannot work as written (exit 2), not a failure at
    /// run time.
    pub fn is_configuration(&self) -> bool {
        matches!(self, DaemonError::ApiTls(_) | DaemonError::Edge(_))
    }
}

use crate::clock::unix_now;

/// The sealed credentials, created on first start (before the cluster, so
/// a cluster without credentials means they were lost, not never made).
fn load_credentials(
    config: &Config,
    identity: &NodeIdentity,
    store: &CredentialStore,
) -> Result<Credentials, DaemonError> {
    if let Some((credentials, method)) = store.load(identity)? {
        if method != config.credentials.encryption_method {
            info!(?method, wanted = ?config.credentials.encryption_method, "resealing db.enc");
            store.save(identity, config.credentials.encryption_method, &credentials)?;
        }
        return Ok(credentials);
    }
    let data_dir = Layout::of(config).data_dir();
    if data_dir.join("PG_VERSION").exists() {
        return Err(DaemonError::CredentialsMissing {
            path: store.path().to_owned(),
            data_dir,
        });
    }
    let credentials = Credentials::generate(config.credentials.password_length, unix_now())?;
    store.save(identity, config.credentials.encryption_method, &credentials)?;
    info!(path = %store.path().display(), "generated and sealed the database credentials");
    Ok(credentials)
}

/// Runs until SIGTERM or SIGINT; Postgres is stopped before this returns.
pub async fn run(config_path: &Path, config: Config) -> Result<(), DaemonError> {
    // The edge's settings are checked before anything is written: a
    // certificate that cannot be served is a configuration error, never a
    // fall back to plaintext.
    let api_cert = match &config.api.tls {
        Some(tls) => Some(Arc::new(ApiCertificate::load(tls)?)),
        None => None,
    };
    if let Some(cert) = &api_cert {
        let days_left = cert.info().days_left(SystemTime::now());
        if days_left < 0 {
            warn!(cert = ?config.api.tls.as_ref().map(|t| &t.cert), days_left, "the api certificate has expired; clients will refuse it until it is renewed");
        }
    }
    let fd_limit = edge::ensure_file_limit(
        config.api.max_connections as usize,
        config.database.pool.max_size as usize,
    )?;
    let _lock = StateLock::acquire(&config.node.state_dir)?;
    let layout = Layout::of(&config);
    let identity_path = layout.identity_key();
    let (identity, created) = NodeIdentity::load_or_create(&identity_path)?;
    let identity = Arc::new(identity);
    let node_id = identity.node_id().to_string();
    info!(node_id, created, path = %identity_path.display(), "node identity loaded");
    let store = CredentialStore::new(layout.credentials().to_owned());
    let credentials = load_credentials(&config, &identity, &store)?;

    let notifier = notify::Notifier::from_env();
    notifier.status("preparing Postgres");
    let rendered = render::render(&config)?;
    let verifier = ScramVerifier::of(&credentials.superuser);
    let Prepared {
        server,
        tls: tls_source,
        pki,
    } = Server::prepare(&config, &rendered, &node_id, verifier).await?;
    let start_timeout = server.start_timeout();
    let logs = server.where_to_look();
    let maintenance = server.superuser_endpoint(&credentials.superuser, "postgres");
    let superuser = server.superuser_endpoint(&credentials.superuser, DATABASE);
    let metrics = Arc::new(Metrics::default());
    let renewal = match (server.tls_address(), &pki) {
        (Some(address), Some(pki)) => Some(renewal::CertificateRenewal {
            server: server.clone(),
            state_dir: config.node.state_dir.clone(),
            node_id: node_id.clone(),
            addresses: vec![address],
            superuser: maintenance.clone(),
            installed: pki.server.cert_pem.clone(),
        }),
        _ => None,
    };
    let supervisor = Supervisor::start(server.clone(), maintenance.clone(), metrics.clone());
    let (stop, shutdown) = shutdown::channel();
    notifier.status("starting Postgres");

    let started = async {
        if !supervisor.wait_ready(start_timeout).await {
            return Err(DaemonError::StartTimeout {
                seconds: start_timeout.as_secs(),
                logs,
                key: Topology::of(&config).start_timeout_key(),
            });
        }
        // The security report's inputs, as the engine reports them.
        let container_facts = server.container_facts().await?;
        if let Some(facts) = &container_facts {
            info!(
                user = %facts.user,
                network_mode = %facts.network_mode,
                cap_drop = ?facts.cap_drop,
                cap_add = ?facts.cap_add,
                readonly_rootfs = facts.readonly_rootfs,
                privileged = facts.privileged,
                published_ports = facts.published_ports,
                security_opt = ?facts.security_opt,
                "docker: container as inspected"
            );
        }
        notifier.status("bootstrap and migrations");
        bootstrap::apply(&maintenance, &superuser, &rendered).await?;
        let mut client = superuser.connect().await.map_err(DaemonError::Connect)?;
        let applied = migrate::apply(&mut client, migrate::MIGRATIONS).await?;
        info!(applied = ?applied, "schema up to date");
        drop(client);
        let login = rotator::login_credential(&identity, &credentials, &tls_source)?;
        let mut base = superuser.config.clone();
        base.application_name("keepd-pool");
        let pool_settings = PoolSettings {
            max_size: config.database.pool.max_size as usize,
            acquire_timeout: config.database.pool.acquire_timeout.get(),
        };
        let pool = RoleAwarePool::new(base, login, pool_settings);
        let rotator = Arc::new(Rotator::new(
            identity.clone(),
            store.clone(),
            RotationSettings {
                method: config.credentials.encryption_method,
                password_length: config.credentials.password_length,
                interval: config.credentials.rotation_interval.get(),
                grace: config.credentials.rotation_grace_period.get(),
                connection_limit: config.database.pool.max_size as i32 + 2,
            },
            credentials.clone(),
            PgAccess {
                superuser: superuser.clone(),
                tls: tls_source.clone(),
            },
            pool.clone(),
            metrics.clone(),
        ));
        let audit_keys = Arc::new(AuditKeys::new(&identity));
        let sealer = AuditSealer::new(
            pool.clone(),
            identity.clone(),
            audit_keys.clone(),
            layout.audit_checkpoint(),
        );
        rotator.reconcile().await?;
        let started_entry = audit::AuditEntry {
            action: audit::AuditAction::NodeStart,
            rows_affected: 0,
            duration: Duration::ZERO,
            source_component: "daemon",
            metadata: serde_json::json!({"version": env!("CARGO_PKG_VERSION")}),
        };
        audit::record_alone(&pool, &node_id, &started_entry)
            .await
            .map_err(RotationError::from)?;
        let active_role = pool.credential_role();
        let report = Report::new(
            measure(&Inputs {
                config: &config,
                identity: &identity,
                superuser: &superuser,
                login_role: &active_role,
                container: container_facts.as_ref(),
                server_certificate: pki.as_ref().map(|p| p.server.cert_pem.as_str()),
                api_certificate: api_cert.as_ref().map(|c| c.info()),
            })
            .await,
        );
        apply_security_policy(&config, &report)?;
        metrics.set_security_level(report.level() as u64 + 1);
        let control_path = layout.control_socket();
        let control = control::bind(&control_path).map_err(|source| DaemonError::Listen {
            what: "the control socket",
            addr: control_path.display().to_string(),
            source,
        })?;
        let listener = tokio::net::TcpListener::bind(config.api.listen)
            .await
            .map_err(|source| DaemonError::Listen {
                what: "api.listen",
                addr: config.api.listen.to_string(),
                source,
            })?;
        let metrics_listener =
            match config.api.metrics_listen {
                Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.map_err(
                    |source| DaemonError::Listen {
                        what: "api.metrics_listen",
                        addr: addr.to_string(),
                        source,
                    },
                )?),
                None => None,
            };
        Ok((
            pool,
            rotator,
            sealer,
            control,
            (listener, metrics_listener),
            audit_keys,
        ))
    };
    let (pool, rotator, sealer, control, (listener, metrics_listener), audit_keys) =
        match started.await {
            Ok(parts) => parts,
            Err(e) => {
                supervisor.stop().await;
                return Err(e);
            }
        };
    let rotation_task = tokio::spawn(rotator.clone().run(shutdown.clone()));
    let control_task = tokio::spawn(control::serve(control, rotator, shutdown.clone()));
    let sealer_task = tokio::spawn(sealer.run(shutdown.clone()));

    let addr = listener.local_addr().map_err(DaemonError::Serve)?;
    let limits = ApiSettings {
        jwt_ttl: config.api.jwt_ttl.get(),
        max_body_bytes: config.api.max_body_bytes,
        max_push_entries: config.api.max_push_entries,
        auth_per_minute: config.api.rate_limits.auth_per_minute,
        request_timeout: config.api.request_timeout.get(),
        body_timeout: config.api.body_timeout.get(),
        trusted_proxies: TrustedProxies::new(&config.api.trusted_proxies),
    };
    let fields = Arc::new(FieldCipher::new(&identity, &config));
    let unsupported = fields.unsupported();
    if !unsupported.is_empty() {
        warn!(
            columns = ?unsupported,
            supported = crate::field_crypto::supported_list(),
            "encryption_at_rest.application.encrypted_fields names columns keepd's schema does not have; they are ignored"
        );
    }
    let reencrypt_task = tokio::spawn(
        reencrypt::Reencryption {
            fields: fields.clone(),
            superuser: superuser.clone(),
        }
        .run(shutdown.clone()),
    );
    let api = Api::new(
        &identity,
        pool,
        supervisor.state(),
        audit_keys,
        metrics.clone(),
        limits,
        fields,
    )?;
    let api = Arc::new(api);
    let mut reloader = reload::Reloader {
        api: api.clone(),
        running: config.clone(),
    };
    let web = WebPolicy {
        cors_origins: config.api.cors_origins.clone(),
        hsts: api_cert.is_some(),
    };
    let metrics_task = match metrics_listener {
        Some(listener) => {
            let addr = listener.local_addr().map_err(DaemonError::Serve)?;
            info!(%addr, "metrics listening");
            let router = api::metrics_router(api.clone());
            let mut stop = shutdown.clone();
            Some(tokio::spawn(async move {
                axum::serve(listener, router)
                    .with_graceful_shutdown(async move { stop.requested().await })
                    .await
            }))
        }
        None => None,
    };
    let app = api::router(api, &web);
    let settings = EdgeSettings {
        header_timeout: config.api.header_timeout.get(),
        idle_timeout: config.api.idle_timeout.get(),
        max_connections: config.api.max_connections as usize,
        max_per_client: config.api.max_connections_per_client as usize,
        trusted: TrustedProxies::new(&config.api.trusted_proxies),
        tls: api_cert.clone(),
    };
    let scheme = if api_cert.is_some() { "https" } else { "http" };
    info!(%addr, node_id, scheme, fd_limit, "api listening");
    let server = tokio::spawn(edge::serve(
        listener,
        app,
        settings,
        metrics.clone(),
        shutdown.clone(),
    ));
    let cert_watch = api_cert
        .clone()
        .map(|cert| tokio::spawn(cert.watch(Duration::from_secs(5), shutdown.clone())));
    notifier.ready();
    let watchdog_task = notify::Notifier::watchdog_interval().map(|every| {
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let notifier = notify::Notifier::from_env();
            loop {
                notifier.watchdog();
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stop.requested() => return,
                }
            }
        })
    });

    let renew = Arc::new(Notify::new());
    let renewal_task =
        renewal.map(|renewal| tokio::spawn(renewal.run(renew.clone(), shutdown.clone())));
    let outcome = wait_for_shutdown(config_path, &renew, &mut reloader, api_cert.as_deref()).await;
    info!("shutting down");
    notifier.stopping();
    stop.trigger();
    if let Some(task) = watchdog_task {
        let _ = task.await;
    }
    match server.await {
        Ok(Err(e)) => error!(error = %e, "api server failed"),
        Err(e) => error!(error = %e, "api server task failed"),
        Ok(Ok(())) => {}
    }
    let _ = tokio::join!(rotation_task, control_task, sealer_task, reencrypt_task);
    for task in [renewal_task, cert_watch].into_iter().flatten() {
        let _ = task.await;
    }
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    let _ = std::fs::remove_file(layout.control_socket());
    supervisor.stop().await;
    info!("keepd stopped");
    outcome
}

/// Shows the report as configured and applies `security.fallback_mode`:
/// strict refuses to start on a failed check or a level below
/// `security.minimum_level`, naming each; warn starts and logs each
/// finding; permissive starts quietly.
fn apply_security_policy(config: &Config, report: &Report) -> Result<(), DaemonError> {
    let security = &config.security;
    if security.log_security_report {
        match config.log.format {
            LogFormat::Human => eprintln!("{}", report.render_box()),
            LogFormat::Json => {
                info!(report = %report.to_json().replace('\n', ""), "security report")
            }
        }
    }
    let level = report.level();
    let findings: Vec<&Check> = report
        .checks
        .iter()
        .filter(|c| matches!(c.status, Status::Warn | Status::Fail))
        .collect();
    let below = level < security.minimum_level;
    match security.fallback_mode {
        FallbackMode::Strict => {
            let mut unmet: Vec<String> = findings
                .iter()
                .filter(|c| c.status == Status::Fail)
                .map(|c| format!("{}: {}", c.id, c.value))
                .collect();
            if below {
                unmet.push(format!(
                    "level {level:?} is below security.minimum_level {:?}",
                    security.minimum_level
                ));
            }
            if !unmet.is_empty() {
                return Err(DaemonError::Security(unmet.join("; ")));
            }
        }
        FallbackMode::Warn => {
            for check in findings {
                warn!(
                    check = check.id,
                    status = ?check.status,
                    value = %check.value,
                    recommendation = %check.recommendation,
                    "security fallback"
                );
            }
            if below {
                warn!(level = ?level, minimum = ?security.minimum_level, "the security level is below security.minimum_level");
            }
        }
        FallbackMode::Permissive => {}
    }
    info!(level = ?level, "security report measured");
    Ok(())
}

/// Returns on SIGTERM or SIGINT. SIGHUP reloads (see `reload`) and checks
/// the TLS certificate.
async fn wait_for_shutdown(
    config_path: &Path,
    renew: &Notify,
    reloader: &mut reload::Reloader,
    api_cert: Option<&ApiCertificate>,
) -> Result<(), DaemonError> {
    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    let mut hup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;
    loop {
        tokio::select! {
            _ = term.recv() => { info!(signal = "SIGTERM", "stop requested"); return Ok(()); }
            _ = int.recv() => { info!(signal = "SIGINT", "stop requested"); return Ok(()); }
            _ = hup.recv() => {
                info!(signal = "SIGHUP", path = %config_path.display(), "reloading the configuration");
                reloader.reload(config_path);
                renew.notify_one();
                if let Some(cert) = api_cert {
                    cert.reload_logged("SIGHUP");
                }
            }
        }
    }
}
