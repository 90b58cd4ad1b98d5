//! `keepd run`: wires the modules together in the one direction data flows
//! (config → render → provision → roles → pool → api → edge) and handles
//! signals. The start is four typed stages, each owning what the next
//! needs: `Node::open` (lock, identity, credentials, the edge's settings)
//! → `provision` (rendered files installed, Postgres supervised) →
//! `bring_up` (schema, roles, pool, report, listeners) → `serve` (the
//! named `Tasks`, stopped in order).

pub mod backups;
pub mod control;
pub mod janitor;
pub mod notify;
mod policy;
pub mod reencrypt;
pub mod reload;
pub mod renewal;
pub mod rotator;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::api::{self, Api, ApiSettings, WebPolicy};
use crate::audit::{self, AuditKeys, AuditSealer};
use crate::backup::{BackupError, PgBackRest};
use crate::cluster::{self, ClusterError, ClusterKey, Membership};
use crate::config::{Config, Layout, Topology};
use crate::edge::{self, ApiCertificate, ApiTlsError, EdgeError, EdgeSettings, TrustedProxies};
use crate::field_crypto::FieldCipher;
use crate::identity::{IdentityError, NodeIdentity, fingerprint};
use crate::metrics::Metrics;
use crate::passwords::PasswordError;
use crate::pki::NodePki;
use crate::postgres::bootstrap::{self, BootstrapError};
use crate::postgres::migrate::{self, MigrateError};
use crate::postgres::pool::{PoolSettings, RoleAwarePool};
use crate::postgres::render::{RenderError, RenderInputs, RenderedConfig};
use crate::postgres::server::{Prepared, ProviderError, Server};
use crate::postgres::supervise::Supervisor;
use crate::postgres::tls::{Endpoint, TlsSource};
use crate::postgres::{DATABASE, describe_error};
use crate::report::Report;
use crate::report::measure::{Inputs, measure};
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
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Backup(#[from] BackupError),
    #[error("stopped while waiting to be admitted to the cluster")]
    NotAdmitted,
}

impl DaemonError {
    /// A setting that cannot work as written (exit 2), not a failure at
    /// run time.
    pub fn is_configuration(&self) -> bool {
        match self {
            DaemonError::ApiTls(_) | DaemonError::Edge(_) => true,
            DaemonError::Provider(crate::postgres::server::ProviderError::Native(e)) => {
                e.is_configuration()
            }
            _ => false,
        }
    }
}

use crate::clock::unix_now;

/// The sealed credentials, created on first start (before the cluster, so
/// a cluster without credentials means they were lost, not never made).
fn load_credentials(
    config: &Config,
    layout: &Layout,
    identity: &NodeIdentity,
    store: &CredentialStore,
) -> Result<Credentials, DaemonError> {
    let mut credentials = existing_or_new_credentials(config, layout, identity, store)?;
    if config.backup.enabled() && credentials.backup_passphrase.is_none() {
        credentials.backup_passphrase = Some(crate::secrets::values::generate_password(64)?);
        store.save(identity, config.credentials.encryption_method, &credentials)?;
        info!(path = %store.path().display(), "generated and sealed the backup repository's passphrase");
    }
    if config.backup.s3.is_some() && credentials.s3.is_none() {
        return Err(DaemonError::Backup(crate::backup::BackupError::NoS3Key));
    }
    Ok(credentials)
}

fn existing_or_new_credentials(
    config: &Config,
    layout: &Layout,
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
    let data_dir = layout.data_dir();
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
    let node = Node::open(config)?;
    let provisioned = node.provision().await?;
    let up = match provisioned.bring_up().await {
        // Stopping a node that was never admitted is an ordinary stop.
        Err(DaemonError::NotAdmitted) => {
            info!("keepd stopped before it was admitted to the cluster");
            return Ok(());
        }
        up => up?,
    };
    up.serve(config_path).await
}

/// Stage 1: the node's own state, before any Postgres. The edge's
/// settings are checked before anything is written: a certificate that
/// cannot be served is a configuration error, never a fall back to
/// plaintext.
struct Node {
    config: Config,
    layout: Layout,
    _lock: StateLock,
    identity: Arc<NodeIdentity>,
    node_id: String,
    store: CredentialStore,
    credentials: Credentials,
    api_cert: Option<Arc<ApiCertificate>>,
    fd_limit: u64,
    notifier: notify::Notifier,
}

impl Node {
    fn open(config: Config) -> Result<Node, DaemonError> {
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
        // Streams hold connections outside api.max_connections.
        let fd_limit = edge::ensure_file_limit(
            (config.api.max_connections + config.api.events.max_streams) as usize,
            config.database.pool.max_size as usize,
        )?;
        let lock = StateLock::acquire(&config.node.state_dir)?;
        // A busy port is found in the first second, before anything is
        // written or started; it is bound again, for good, once keepd can
        // answer on it (bound now, clients would wait in its backlog).
        drop(bind("api.listen", config.api.listen)?);
        if let Some(addr) = config.api.metrics_listen {
            drop(bind("api.metrics_listen", addr)?);
        }
        let layout = Layout::of(&config);
        let identity_path = layout.identity_key();
        let (identity, created) = NodeIdentity::load_or_create(&identity_path)?;
        let identity = Arc::new(identity);
        let node_id = identity.node_id().to_string();
        info!(node_id, created, path = %identity_path.display(), "node identity loaded");
        let store = CredentialStore::new(layout.credentials().to_owned());
        let credentials = load_credentials(&config, &layout, &identity, &store)?;
        Ok(Node {
            config,
            layout,
            _lock: lock,
            identity,
            node_id,
            store,
            credentials,
            api_cert,
            fd_limit,
            notifier: notify::Notifier::from_env(),
        })
    }

    /// Stage 2: the rendered configuration installed by the provider and
    /// Postgres started under supervision.
    async fn provision(self) -> Result<Provisioned, DaemonError> {
        self.notifier.status("preparing Postgres");
        let verifier = ScramVerifier::of(&self.credentials.superuser);
        let Prepared {
            server,
            rendered,
            tls,
            pki,
        } = Server::prepare(
            &self.config,
            RenderInputs::of(&self.config),
            &self.node_id,
            verifier,
            crate::repository::RepositoryEnv::of(&self.credentials),
        )
        .await?;
        let password = &self.credentials.superuser;
        let maintenance = server.superuser_endpoint(password, "postgres");
        let superuser = server.superuser_endpoint(password, DATABASE);
        let metrics = Arc::new(Metrics::default());
        let supervisor = Supervisor::start(server.clone(), maintenance.clone(), metrics.clone());
        self.notifier.status("starting Postgres");
        Ok(Provisioned {
            node: self,
            rendered,
            server,
            tls,
            pki,
            maintenance,
            superuser,
            metrics,
            supervisor,
        })
    }
}

/// Stage 2: a Postgres starting under supervision.
struct Provisioned {
    node: Node,
    rendered: RenderedConfig,
    server: Server,
    tls: TlsSource,
    pki: Option<Arc<NodePki>>,
    /// The superuser on the maintenance database `postgres`.
    maintenance: Endpoint,
    /// The superuser on keepd's database.
    superuser: Endpoint,
    metrics: Arc<Metrics>,
    supervisor: Supervisor,
}

/// What serving needs that bringing up made.
struct Parts {
    pool: RoleAwarePool,
    rotator: Arc<Rotator>,
    sealer: AuditSealer,
    cluster: ClusterKey,
    backups: Option<Arc<PgBackRest>>,
    /// Wakes the certificate renewal: SIGHUP, or a revocation to apply.
    renew: Arc<Notify>,
    control: tokio::net::UnixListener,
    listener: tokio::net::TcpListener,
    metrics_listener: Option<tokio::net::TcpListener>,
}

/// Stage 3: schema current, roles reconciled, the report applied, every
/// listener bound; nothing served yet.
struct BroughtUp {
    provisioned: Provisioned,
    parts: Parts,
}

impl Provisioned {
    /// Stage 3; on failure Postgres is stopped before the error returns.
    async fn bring_up(self) -> Result<BroughtUp, DaemonError> {
        match self.bring_up_parts().await {
            Ok(parts) => Ok(BroughtUp {
                provisioned: self,
                parts,
            }),
            Err(e) => {
                self.supervisor.stop().await;
                Err(e)
            }
        }
    }

    async fn bring_up_parts(&self) -> Result<Parts, DaemonError> {
        let Node {
            config,
            layout,
            identity,
            node_id,
            store,
            credentials,
            notifier,
            ..
        } = &self.node;
        let start_timeout = self.server.start_timeout();
        if !self.supervisor.wait_ready(start_timeout).await {
            return Err(DaemonError::StartTimeout {
                seconds: start_timeout.as_secs(),
                logs: self.server.where_to_look(),
                key: Topology::of(config).start_timeout_key(),
            });
        }
        // The security report's inputs, as the engine reports them.
        let container_facts = self.server.container_facts().await?;
        if let Some(facts) = &container_facts {
            info!(
                container = facts.name,
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
        let superuser = &self.superuser;
        bootstrap::apply(&self.maintenance, superuser, &self.rendered).await?;
        let mut client = superuser.connect().await.map_err(DaemonError::Connect)?;
        let applied = migrate::apply(&mut client, migrate::MIGRATIONS).await?;
        info!(applied = ?applied, "schema up to date");
        let backups = match config.backup.enabled() {
            true => {
                let backups = Arc::new(PgBackRest::new(config, credentials, &self.node.node_id)?);
                backups.stanza_create().await?;
                // A directory repository keeps a copy of db.enc (sealed)
                // for a restore onto a fresh state directory; pgBackRest
                // cannot put a file of keepd's into a bucket.
                if let Some(repository) = &config.backup.repository {
                    let copy = crate::repository::credentials_copy(repository);
                    let sealed = std::fs::read(layout.credentials())
                        .and_then(|bytes| crate::fsutil::write_atomic(&copy, &bytes, None));
                    if let Err(source) = sealed {
                        return Err(DaemonError::Directory { path: copy, source });
                    }
                }
                let repository = match (&config.backup.repository, &config.backup.s3) {
                    (Some(dir), _) => dir.display().to_string(),
                    (None, Some(s3)) => format!("s3://{}{} at {}", s3.bucket, s3.path, s3.endpoint),
                    (None, None) => String::new(),
                };
                info!(repository, "backup repository ready; WAL is archived there");
                Some(backups)
            }
            false => None,
        };
        let field_versions = config.encryption_at_rest.application.key_version;
        let joined = cluster::join(&mut client, identity, field_versions).await?;
        drop(client);
        let api_socket = bind("api.listen", config.api.listen)?;
        let cluster = match joined {
            Membership::Member(key) => key,
            Membership::Pending => self.await_admission(&api_socket, field_versions).await?,
        };
        cluster::check_pin(&cluster, &layout.cluster_pin())?;
        let login = rotator::login_credential(identity, credentials, &self.tls)?;
        let mut base = superuser.config.clone();
        base.application_name("keepd-pool");
        let pool_settings = PoolSettings {
            max_size: config.database.pool.max_size as usize,
            acquire_timeout: config.database.pool.acquire_timeout.get(),
        };
        let pool = RoleAwarePool::new(base, login, pool_settings);
        let renew = Arc::new(Notify::new());
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
                tls: self.tls.clone(),
                pki_changed: renew.clone(),
            },
            pool.clone(),
            self.metrics.clone(),
        ));
        let audit_keys = Arc::new(AuditKeys::new(identity));
        let sealer = AuditSealer::new(
            pool.clone(),
            identity.clone(),
            audit_keys,
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
        audit::record_alone(&pool, node_id, &started_entry)
            .await
            .map_err(RotationError::from)?;
        record_restore(&pool, node_id, &layout.restore_note()).await?;
        let active_role = pool.credential_role();
        let report = Report::new(
            measure(&Inputs {
                backups: backups.as_deref().map(Ok),
                config,
                identity,
                superuser,
                login_role: &active_role,
                container: container_facts.as_ref(),
                server_certificate: self.pki.as_ref().map(|p| p.server.cert_pem.as_str()),
                api_certificate: self.node.api_cert.as_ref().map(|c| c.info()),
            })
            .await,
        );
        policy::apply(config, &report)?;
        self.metrics.set_security_level(
            report.level() as u64 + 1,
            config.security.minimum_level as u64 + 1,
        );
        self.metrics.set_backup_enabled(config.backup.enabled());
        let control_path = layout.control_socket();
        let control = control::bind(&control_path).map_err(|source| DaemonError::Listen {
            what: "the control socket",
            addr: control_path.display().to_string(),
            source,
        })?;
        let listener = serving("api.listen", api_socket)?;
        let metrics_listener = match config.api.metrics_listen {
            Some(addr) => Some(serving(
                "api.metrics_listen",
                bind("api.metrics_listen", addr)?,
            )?),
            None => None,
        };
        Ok(Parts {
            pool,
            rotator,
            sealer,
            cluster,
            backups,
            renew,
            control,
            listener,
            metrics_listener,
        })
    }
}

/// A restore `keepd restore` made since the last start goes into the audit
/// trail (the chain continues from the restored point), once.
async fn record_restore(
    pool: &RoleAwarePool,
    node_id: &str,
    note: &Path,
) -> Result<(), DaemonError> {
    let Ok(text) = std::fs::read_to_string(note) else {
        return Ok(());
    };
    let metadata = serde_json::from_str(&text)
        .unwrap_or_else(|_| serde_json::json!({"note": "unreadable", "text": text}));
    let entry = audit::AuditEntry {
        action: audit::AuditAction::NodeRestore,
        rows_affected: 0,
        duration: Duration::ZERO,
        source_component: "restore",
        metadata,
    };
    audit::record_alone(pool, node_id, &entry)
        .await
        .map_err(RotationError::from)?;
    std::fs::remove_file(note).map_err(|source| DaemonError::Directory {
        path: note.to_owned(),
        source,
    })?;
    info!(metadata = %entry.metadata, "recorded the restore from a backup in the audit trail");
    Ok(())
}

/// How often a node waiting to be admitted looks for its sealed key.
const ADMISSION_POLL: Duration = Duration::from_secs(2);

impl Provisioned {
    /// A node the cluster has not admitted: answers 503 with the reason on
    /// every route and looks for its sealed key every ADMISSION_POLL until
    /// an operator admits it, or it is told to stop (`NotAdmitted`).
    async fn await_admission(
        &self,
        socket: &std::net::TcpListener,
        field_versions: u32,
    ) -> Result<ClusterKey, DaemonError> {
        let node = &self.node;
        let (stop, shutdown) = shutdown::channel();
        let trusted = TrustedProxies::new(&node.config.api.trusted_proxies);
        // A second descriptor of the socket: the API serves the first.
        let copy = socket.try_clone().map_err(|source| DaemonError::Listen {
            what: "api.listen",
            addr: node.config.api.listen.to_string(),
            source,
        })?;
        let listener = serving("api.listen", copy)?;
        let addr = listener.local_addr().map_err(DaemonError::Serve)?;
        info!(%addr, node_id = node.node_id, state = "pending", "api listening");
        let server = tokio::spawn(edge::serve(
            listener,
            api::pending_router(node.node_id.clone()),
            edge_settings(&node.config, trusted, node.api_cert.clone()),
            self.metrics.clone(),
            shutdown,
        ));
        warn!(
            node_id = node.node_id,
            fingerprint = fingerprint(&node.identity.public_key()),
            "cluster: waiting to be admitted; on an admitted node, check that `keepd cluster \
             pending` shows this fingerprint, then run `keepd cluster admit {}`",
            node.node_id
        );
        node.notifier
            .status("waiting to be admitted to the cluster");
        let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
        let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
        let outcome = loop {
            tokio::select! {
                _ = tokio::time::sleep(ADMISSION_POLL) => {}
                _ = term.recv() => break Err(DaemonError::NotAdmitted),
                _ = int.recv() => break Err(DaemonError::NotAdmitted),
            }
            let joined = async {
                let mut client = self
                    .superuser
                    .connect()
                    .await
                    .map_err(DaemonError::Connect)?;
                Ok::<_, DaemonError>(
                    cluster::join(&mut client, &node.identity, field_versions).await?,
                )
            };
            match joined.await {
                Ok(Membership::Member(key)) => {
                    info!(node_id = node.node_id, "cluster: admitted");
                    break Ok(key);
                }
                Ok(Membership::Pending) => {}
                // Postgres restarting, say: the next look may succeed.
                Err(e) => warn!(error = %e, "cluster: cannot look for this node's admission"),
            }
        };
        stop.trigger();
        server.await?.map_err(DaemonError::Serve)?;
        outcome
    }
}

fn bind(what: &'static str, addr: SocketAddr) -> Result<std::net::TcpListener, DaemonError> {
    let listen = |addr| {
        let listener = std::net::TcpListener::bind(addr)?;
        // std listens with a backlog of 128: under a connection flood the
        // kernel then drops ordinary clients' SYNs (a retry costs them a
        // second). Listening again raises it to the system's maximum.
        nix::sys::socket::listen(&listener, nix::sys::socket::Backlog::MAXCONN)?;
        listener.set_nonblocking(true)?;
        Ok::<_, std::io::Error>(listener)
    };
    listen(addr).map_err(|source| DaemonError::Listen {
        what,
        addr: addr.to_string(),
        source,
    })
}

/// The bound socket, for tokio.
fn serving(
    what: &'static str,
    listener: std::net::TcpListener,
) -> Result<tokio::net::TcpListener, DaemonError> {
    let addr = listener
        .local_addr()
        .map_or_else(|_| "?".into(), |a| a.to_string());
    tokio::net::TcpListener::from_std(listener).map_err(|source| DaemonError::Listen {
        what,
        addr,
        source,
    })
}

impl BroughtUp {
    /// Stage 4: serve until SIGTERM or SIGINT, then stop everything in
    /// order (the API first, Postgres last).
    async fn serve(self, config_path: &Path) -> Result<(), DaemonError> {
        let BroughtUp { provisioned, parts } = self;
        let Provisioned {
            node,
            server,
            pki,
            maintenance,
            superuser,
            metrics,
            supervisor,
            ..
        } = provisioned;
        let config = &node.config;
        let (stop, shutdown) = shutdown::channel();
        let addr = parts.listener.local_addr().map_err(DaemonError::Serve)?;
        let fields = Arc::new(FieldCipher::new(&parts.cluster, config));
        let unsupported = fields.plan().unsupported();
        if !unsupported.is_empty() {
            warn!(
                columns = ?unsupported,
                supported = crate::field_crypto::supported_list(),
                "encryption_at_rest.application.encrypted_fields names columns keepd's schema does not have; they are ignored"
            );
        }
        // One reading of api.trusted_proxies for the API and the edge.
        let trusted = TrustedProxies::new(&config.api.trusted_proxies);
        let api = Arc::new(Api::new(
            &node.identity,
            parts.pool,
            supervisor.state(),
            &parts.cluster,
            metrics.clone(),
            api_settings(config, trusted.clone()),
            fields.clone(),
        )?);
        let mut reloader = reload::Reloader {
            api: api.clone(),
            running: config.clone(),
        };
        let renewal = match (server.tls_address(), &pki) {
            (Some(address), Some(pki)) => Some(renewal::CertificateRenewal {
                server: server.clone(),
                state_dir: config.node.state_dir.clone(),
                node_id: node.node_id.clone(),
                addresses: vec![address],
                superuser: maintenance.clone(),
                installed: pki.server.cert_pem.clone(),
                installed_crl: pki.crl_pem.clone(),
            }),
            _ => None,
        };
        let renew = parts.renew.clone();
        let web = WebPolicy {
            cors_origins: config.api.cors_origins.clone(),
            hsts: node.api_cert.is_some(),
        };
        let metrics_api = parts
            .metrics_listener
            .map(|listener| (listener, api.clone()));
        let events = api.events.clone();
        let operator = api.clone();
        let limited = api.clone();
        let app = api::router(api, &web);
        let scheme = if node.api_cert.is_some() {
            "https"
        } else {
            "http"
        };
        info!(%addr, node_id = node.node_id, scheme, fd_limit = node.fd_limit, "api listening");
        let tasks = Tasks {
            watchdog: notify::Notifier::spawn_watchdog(shutdown.clone()),
            api: tokio::spawn(edge::serve(
                parts.listener,
                app,
                edge_settings(config, trusted, node.api_cert.clone()),
                metrics.clone(),
                shutdown.clone(),
            )),
            metrics: match metrics_api {
                Some((listener, api)) => Some(serve_metrics(listener, api, shutdown.clone())?),
                None => None,
            },
            rotation: tokio::spawn(parts.rotator.clone().run(shutdown.clone())),
            control: tokio::spawn(control::serve(
                parts.control,
                parts.rotator,
                operator,
                shutdown.clone(),
            )),
            sealer: tokio::spawn(parts.sealer.run(shutdown.clone())),
            events: tokio::spawn(crate::api::events::listen(
                superuser.clone(),
                events,
                shutdown.clone(),
            )),
            heartbeat: tokio::spawn(crate::cluster::heartbeat::run(
                superuser.clone(),
                node.node_id.to_string(),
                move |nodes| limited.set_cluster_nodes(nodes),
                shutdown.clone(),
            )),
            reencrypt: tokio::spawn(
                reencrypt::Reencryption {
                    fields,
                    superuser: superuser.clone(),
                }
                .run(shutdown.clone()),
            ),
            backups: parts.backups.map(|pgbackrest| {
                tokio::spawn(
                    backups::BackupSchedule {
                        pgbackrest,
                        superuser: superuser.clone(),
                        full_interval: config.backup.full_interval.get(),
                        diff_interval: config.backup.diff_interval.get(),
                        metrics: metrics.clone(),
                    }
                    .run(shutdown.clone()),
                )
            }),
            janitor: tokio::spawn(
                janitor::Janitor {
                    superuser: superuser.clone(),
                    idempotency_ttl: config.api.idempotency_ttl.get(),
                    revoked_device_retention: config.api.quotas.revoked_device_retention.get(),
                    postgres_logs: matches!(
                        config.database.postgres.provider,
                        crate::config::Provider::Native
                    )
                    .then(|| {
                        (
                            node.layout.postgres_log_dir(),
                            config.database.postgres.log_retention.get(),
                        )
                    }),
                }
                .run(shutdown.clone()),
            ),
            renewal: renewal
                .map(|renewal| tokio::spawn(renewal.run(renew.clone(), shutdown.clone()))),
            cert_watch: node
                .api_cert
                .clone()
                .map(|cert| tokio::spawn(cert.watch(Duration::from_secs(5), shutdown.clone()))),
        };
        node.notifier.ready();
        let outcome =
            wait_for_shutdown(config_path, &renew, &mut reloader, node.api_cert.as_deref()).await;
        info!("shutting down");
        node.notifier.stopping();
        tasks.shutdown(stop).await;
        if config.backup.enabled() {
            // The last commits into the archive too, so a restore can
            // reach the moment of this stop.
            match crate::backup::archive_current_wal(&superuser).await {
                Ok(segment) => info!(segment, "archived the current WAL segment before stopping"),
                Err(e) => {
                    warn!(error = %e, "could not archive the current WAL segment before stopping")
                }
            }
        }
        let _ = std::fs::remove_file(node.layout.control_socket());
        supervisor.stop().await;
        info!("keepd stopped");
        outcome
    }
}

fn api_settings(config: &Config, trusted_proxies: TrustedProxies) -> ApiSettings {
    ApiSettings {
        jwt_ttl: config.api.jwt_ttl.get(),
        max_body_bytes: config.api.max_body_bytes,
        max_push_entries: config.api.max_push_entries,
        max_entry_bytes: config.api.max_entry_bytes,
        max_pull_bytes: config.api.max_pull_bytes,
        rate_limits: config.api.rate_limits.clone(),
        quotas: config.api.quotas.clone(),
        backups: config.api.backups.clone(),
        registration: config.api.registration,
        request_timeout: config.api.request_timeout.get(),
        body_timeout: config.api.body_timeout.get(),
        trusted_proxies,
        idempotency_ttl: config.api.idempotency_ttl.get(),
        events: config.api.events.clone(),
        prefixes: edge::ClientPrefixes::new(
            config.api.client_prefix_v4,
            config.api.client_prefix_v6,
        ),
    }
}

fn edge_settings(
    config: &Config,
    trusted: TrustedProxies,
    tls: Option<Arc<ApiCertificate>>,
) -> EdgeSettings {
    EdgeSettings::new(&config.api, trusted, tls)
}

/// `/metrics` on its own listener (`api.metrics_listen`).
fn serve_metrics(
    listener: tokio::net::TcpListener,
    api: Arc<Api>,
    mut stop: shutdown::Shutdown,
) -> Result<JoinHandle<std::io::Result<()>>, DaemonError> {
    let addr = listener.local_addr().map_err(DaemonError::Serve)?;
    info!(%addr, "metrics listening");
    let router = api::metrics_router(api);
    Ok(tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move { stop.requested().await })
            .await
    }))
}

/// The daemon's running tasks, each named, stopped together.
struct Tasks {
    watchdog: Option<JoinHandle<()>>,
    api: JoinHandle<std::io::Result<()>>,
    metrics: Option<JoinHandle<std::io::Result<()>>>,
    rotation: JoinHandle<()>,
    control: JoinHandle<()>,
    sealer: JoinHandle<()>,
    reencrypt: JoinHandle<()>,
    janitor: JoinHandle<()>,
    /// LISTENs for new entries and feeds the live-update streams.
    events: JoinHandle<()>,
    /// Marks this node live and counts the live nodes for rate budgets.
    heartbeat: JoinHandle<()>,
    /// Aborted at shutdown: a backup under way is not waited for (its
    /// pgBackRest is killed, and the next start takes it again).
    backups: Option<JoinHandle<()>>,
    renewal: Option<JoinHandle<()>>,
    cert_watch: Option<JoinHandle<()>>,
}

impl Tasks {
    /// Asks every task to stop and waits for each: the watchdog and the
    /// API first (no new work), then the background tasks.
    async fn shutdown(self, stop: shutdown::ShutdownTrigger) {
        stop.trigger();
        if let Some(task) = self.watchdog {
            let _ = task.await;
        }
        match self.api.await {
            Ok(Err(e)) => error!(error = %e, "api server failed"),
            Err(e) => error!(error = %e, "api server task failed"),
            Ok(Ok(())) => {}
        }
        let _ = tokio::join!(
            self.rotation,
            self.control,
            self.sealer,
            self.reencrypt,
            self.janitor,
            self.events,
            self.heartbeat
        );
        if let Some(task) = self.backups {
            task.abort();
            let _ = task.await;
        }
        for task in [self.renewal, self.cert_watch].into_iter().flatten() {
            let _ = task.await;
        }
        if let Some(task) = self.metrics {
            let _ = task.await;
        }
    }
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
