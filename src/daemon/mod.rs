//! `keepd run`: wires the modules together in the one direction data flows
//! (config → render → provision → roles → pool → api → edge) and handles
//! signals. The start is four typed stages, each owning what the next
//! needs: `Node::open` (lock, identity, credentials, the edge's settings)
//! → `provision` (rendered files installed, Postgres supervised) →
//! `bring_up` (schema, roles, pool, report, listeners) → `serve` (the
//! named `Tasks`, stopped in order). This module only wires: each
//! component builds itself from its own section of the configuration
//! (`Janitor::new`, `BackupSchedule::new`, `ApiSettings::new`,
//! `EdgeSettings::new`, ...), and the steps of each stage live beside it
//! (`bring_up`, `tasks`, `backups`, `admission`). The signals are
//! registered first of all (`signals`), so a stop during start-up is held
//! until keepd can stop in order.

mod admission;
pub mod backups;
mod bring_up;
pub mod control;
mod credentials;
mod db_metrics;
mod error;
pub mod janitor;
mod keys;
mod listeners;
pub mod notify;
mod policy;
mod record;
pub mod reencrypt;
pub mod reload;
mod remeasure;
pub mod renewal;
mod root;
pub mod rotator;
mod signals;
mod tasks;
pub mod token_admission;

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::Notify;
use tracing::{info, warn};

pub use error::DaemonError;

use crate::audit::{AuditKeys, AuditSealer};
use crate::backup::PgBackRest;
use crate::cluster::{self, ClusterKey, Membership};
use crate::config::{Config, Layout};
use crate::edge::{self, ApiCertificate};
use crate::field_keys;
use crate::identity::NodeIdentity;
use crate::identity::protection::IdentityStore;
use crate::metrics::Metrics;
use crate::pki::NodePki;
use crate::postgres::DATABASE;
use crate::postgres::pool::RoleAwarePool;
use crate::postgres::render::{RenderInputs, RenderedConfig};
use crate::postgres::server::{Prepared, Server};
use crate::postgres::supervise::Supervisor;
use crate::postgres::tls::{Endpoint, TlsSource};
use crate::secrets::store::{CredentialStore, Credentials};
use crate::secrets::values::{ScramVerifier, SharedPassword};
use crate::shutdown;
use crate::state_lock::StateLock;
use rotator::Rotator;
use signals::Signals;
use tasks::{Serving, Tasks};

/// Runs until SIGTERM or SIGINT; Postgres is stopped before this returns.
pub async fn run(config_path: &Path, config: Config) -> Result<(), DaemonError> {
    let mut signals = Signals::register()?;
    let node = Node::open(config)?;
    let provisioned = node.provision().await?;
    let up = match provisioned.bring_up(&mut signals).await {
        // Stopping a node that was never admitted is an ordinary stop.
        Err(DaemonError::NotAdmitted) => {
            info!("keepd stopped before it was admitted to the cluster");
            return Ok(());
        }
        up => up?,
    };
    up.serve(config_path, signals).await
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
        drop(listeners::bind("api.listen", config.api.listen)?);
        if let Some(addr) = config.api.metrics_listen {
            drop(listeners::bind("api.metrics_listen", addr)?);
        }
        let layout = Layout::of(&config);
        let identities = IdentityStore::of(&config);
        let (identity, created) = identities.load_or_create()?;
        let identity = Arc::new(identity);
        let node_id = identity.node_id().to_string();
        info!(node_id, created, path = %identities.path().display(),
            protection = identities.protection().describe(), "node identity loaded");
        let store = CredentialStore::new(layout.credentials().to_owned());
        let credentials = credentials::load_credentials(&config, &layout, &identity, &store)?;
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
        let mut maintenance = server.superuser_endpoint(password, "postgres");
        let mut superuser = server.superuser_endpoint(password, DATABASE);
        // keepd's own superuser rotates (`Rotator::rotate_superuser`):
        // every endpoint reads its password from one place.
        if server.superuser_is_keepds() {
            let rotating = SharedPassword::new(
                self.credentials.superuser.clone(),
                self.credentials.superuser_next.clone(),
            );
            maintenance = maintenance.sharing(&rotating);
            superuser = superuser.sharing(&rotating);
        }
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
    /// The field key version the cluster seals under now.
    field_version: u32,
    /// The container as the engine reported it (docker), for the report.
    container: Option<crate::postgres::docker::ContainerFacts>,
    /// The security level measured at start.
    level: crate::config::SecurityLevel,
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
    async fn bring_up(self, signals: &mut Signals) -> Result<BroughtUp, DaemonError> {
        match self.bring_up_parts(signals).await {
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

    async fn bring_up_parts(&self, signals: &mut Signals) -> Result<Parts, DaemonError> {
        let Node {
            config,
            layout,
            identity,
            node_id,
            credentials,
            notifier,
            ..
        } = &self.node;
        self.wait_ready().await?;
        let container = self.container_facts().await?;
        notifier.status("bootstrap and migrations");
        let mut client = self.bootstrap_and_migrate().await?;
        let backups =
            backups::set_up(config, layout, credentials, node_id, &self.superuser).await?;
        let field_versions = config.encryption_at_rest.application.key_version;
        let token = admission::join_token(config)?;
        let joined = cluster::join(&mut client, identity, field_versions, token.as_ref()).await?;
        drop(client);
        let api_socket = listeners::bind("api.listen", config.api.listen)?;
        let cluster = match joined {
            Membership::Member(key) => key,
            Membership::Pending => {
                self.await_admission(&api_socket, field_versions, token.as_ref(), signals)
                    .await?
            }
        };
        cluster::check_pin(&cluster, &layout.cluster_pin())?;
        // The version the cluster seals under, before any value is sealed.
        let client = self
            .superuser
            .connect()
            .await
            .map_err(DaemonError::Connect)?;
        let field_version = field_keys::ensure(&client, field_versions, cluster.generation())
            .await
            .map_err(DaemonError::FieldKeys)?;
        drop(client);
        let renew = Arc::new(Notify::new());
        let (pool, rotator) = self.pool_and_rotator(&renew)?;
        let keys = Arc::new(AuditKeys::new(identity));
        let sealer = AuditSealer::new(
            pool.clone(),
            identity.clone(),
            keys,
            layout.audit_checkpoint(),
        )
        .forwarding(config.audit.forward.clone());
        rotator.reconcile().await?;
        record::start(&pool, node_id, layout).await?;
        let level = self
            .measure_and_apply(&pool, backups.as_deref(), container.as_ref())
            .await?;
        let (control, listener, metrics_listener) = listeners::open(config, layout, api_socket)?;
        Ok(Parts {
            pool,
            rotator,
            sealer,
            cluster,
            field_version,
            container,
            level,
            backups,
            renew,
            control,
            listener,
            metrics_listener,
        })
    }
}

impl BroughtUp {
    /// Stage 4: serve until SIGTERM or SIGINT, then stop everything in
    /// order (the API first, Postgres last).
    async fn serve(self, config_path: &Path, mut signals: Signals) -> Result<(), DaemonError> {
        let (stop, shutdown) = shutdown::channel();
        let (serving, wiring) = self.wire()?;
        let Serving {
            node,
            superuser,
            supervisor,
            mut reloader,
            renew,
        } = serving;
        let config = &node.config;
        let tasks = Tasks::start(config, wiring, &shutdown)?;
        node.notifier.ready();
        let api_cert = node.api_cert.as_deref();
        tasks::wait_for_shutdown(&mut signals, config_path, &renew, &mut reloader, api_cert).await;
        info!("shutting down");
        node.notifier.stopping();
        tasks.shutdown(stop).await;
        if config.backup.enabled() {
            backups::archive_before_stop(&superuser).await;
        }
        let _ = std::fs::remove_file(node.layout.control_socket());
        supervisor.stop().await;
        info!("keepd stopped");
        Ok(())
    }
}
