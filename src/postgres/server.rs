//! The provider boundary: the one place that knows there are exactly three
//! ways to have a Postgres (a native child, a container, an external
//! server). `Server::prepare` turns the configuration into a server ready
//! to start, with the TLS its clients use and the node PKI when keepd
//! issues certificates; the supervisor starts and stops it without
//! knowing which it is.
//!
//! What it does not know: roles, schema, the pool. Those are the same on
//! every provider and live after it in the data flow.

use std::io::BufRead;
use std::net::IpAddr;
use std::process::{Child, ExitStatus};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tracing::{info, warn};

use super::child::ChildLauncher;
use super::docker::{ContainerFacts, DockerCluster, DockerError};
use super::external::{ExternalError, ExternalServer};
use super::native::{NativeCluster, NativeError};
use super::render::{RenderInputs, RenderedConfig, render};
use super::stop_ladder;
use super::tls::{Endpoint, TlsSource};
use crate::config::{Backend, Config, Layout, Provider, Topology};
use crate::fsutil;
use crate::pki::{NodePki, PkiError};
use crate::secrets::values::{ScramVerifier, SecretString};

/// Why a provider could not prepare, start or serve its Postgres.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error(transparent)]
    Native(#[from] NativeError),
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error(transparent)]
    External(#[from] ExternalError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("cannot start postgres: {0}")]
    Spawn(std::io::Error),
    #[error("cannot create {path}: {source}")]
    Directory {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("a provider task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// A server ready to start, and how keepd's connections to it are secured.
pub struct Prepared {
    pub server: Server,
    /// What the provider rendered for the server it found (external:
    /// the inputs as configured, installed nowhere).
    pub rendered: RenderedConfig,
    /// TLS for every role keepd logs in as.
    pub tls: TlsSource,
    /// The node PKI, when keepd issues the server's certificate (TCP mode
    /// on its own servers).
    pub pki: Option<Arc<NodePki>>,
}

/// The server to keep running.
#[derive(Clone)]
pub enum Server {
    Native(Arc<NativeCluster>),
    Docker(Arc<DockerCluster>),
    /// A server keepd does not run: watched through its probe only.
    External(Arc<ExternalServer>),
}

impl Server {
    /// Everything up to (not including) starting the server: the data
    /// directory or container brought in line with the rendered
    /// configuration and db.enc (Postgres receives the superuser's
    /// verifier, never the password), and the TLS it is reached with.
    pub async fn prepare(
        config: &Config,
        inputs: RenderInputs,
        node_id: &str,
        verifier: ScramVerifier,
        archive_env: crate::repository::RepositoryEnv,
    ) -> Result<Prepared, ProviderError> {
        // PostgreSQL is the one backend; another would start here.
        let Backend::Postgres = config.database.backend;
        let topology = Topology::of(config);
        match topology.provider {
            Provider::External => {
                // Nothing else makes keepd's own directories in this mode.
                for dir in [&config.node.state_dir, &config.node.runtime_dir] {
                    fsutil::create_dir_if_missing(dir, 0o700).map_err(|source| {
                        ProviderError::Directory {
                            path: dir.clone(),
                            source,
                        }
                    })?;
                }
                let external = ExternalServer::from_config(config)?;
                info!(server = %external.describe(), "external postgres: keepd manages its roles and schema there and renders nothing");
                Ok(Prepared {
                    rendered: render(&inputs).map_err(NativeError::Render)?,
                    tls: TlsSource::Shared(external.tls()),
                    server: Server::External(Arc::new(external)),
                    pki: None,
                })
            }
            Provider::Docker => {
                // The container's certificate names its address on the
                // internal network, so docker issues it once it knows that.
                let (cluster, rendered) =
                    DockerCluster::prepare(config, inputs, node_id, &verifier, archive_env).await?;
                let pki = cluster.pki();
                Ok(Prepared {
                    rendered,
                    tls: TlsSource::from_pki(pki.as_ref()),
                    server: Server::Docker(Arc::new(cluster)),
                    pki,
                })
            }
            Provider::Native => {
                // TCP mode: the node's CA, the server certificate for the
                // address keepd dials, client certificates per role.
                let pki = if topology.issues_certificates() {
                    let addresses = [config.network.bind_address];
                    let pki = NodePki::ensure(
                        Layout::of(config).state_dir(),
                        node_id,
                        &addresses,
                        SystemTime::now(),
                    )?
                    .with_client_lifetime(config.credentials.rotation_interval.get());
                    Some(Arc::new(pki))
                } else {
                    None
                };
                let (cluster, rendered) = {
                    let (config, pki) = (config.clone(), pki.clone());
                    tokio::task::spawn_blocking(move || {
                        let (cluster, rendered) =
                            NativeCluster::prepare(&config, inputs, pki.as_ref(), archive_env)?;
                        cluster.clear_stale_pid()?;
                        cluster.set_superuser_verifier(&verifier)?;
                        Ok::<_, NativeError>((cluster, rendered))
                    })
                    .await??
                };
                Ok(Prepared {
                    rendered,
                    tls: TlsSource::from_pki(pki.as_ref()),
                    server: Server::Native(Arc::new(cluster)),
                    pki,
                })
            }
        }
    }

    /// The container as the engine reports it (docker only): the security
    /// report's inputs.
    pub async fn container_facts(&self) -> Result<Option<ContainerFacts>, ProviderError> {
        match self {
            Server::Docker(cluster) => Ok(Some(cluster.facts().await?)),
            Server::Native(_) | Server::External(_) => Ok(None),
        }
    }

    /// How long the server may take to accept connections at start.
    pub fn start_timeout(&self) -> Duration {
        match self {
            Server::Native(c) => c.start_timeout,
            Server::Docker(c) => c.start_timeout,
            Server::External(c) => c.start_timeout,
        }
    }

    /// Starts the server; the handle tells when it dies and stops it.
    pub(super) async fn launch(&self) -> Result<Running, ProviderError> {
        match self {
            Server::Native(cluster) => {
                let cluster2 = cluster.clone();
                tokio::task::spawn_blocking(move || cluster2.clear_stale_pid()).await??;
                let child = ChildLauncher::get()
                    .spawn(cluster.postmaster_command(), Signal::SIGQUIT)
                    .map_err(ProviderError::Spawn)?;
                let postmaster = Postmaster::new(child);
                info!(
                    pid = postmaster.pid,
                    "postgres started; waiting for it to accept connections"
                );
                Ok(Running::Process(postmaster, cluster.clone()))
            }
            Server::Docker(cluster) => {
                cluster.start().await?;
                info!(
                    container = cluster.container_name(),
                    "postgres container running; waiting for it to accept connections"
                );
                Ok(Running::Container(cluster.clone()))
            }
            Server::External(server) => {
                info!(server = %server.describe(), "external postgres: waiting for it to accept connections");
                Ok(Running::External)
            }
        }
    }

    /// The bootstrap superuser's connection settings for this server.
    pub fn superuser_endpoint(&self, password: &SecretString, dbname: &str) -> Endpoint {
        match self {
            Server::Native(c) => c.superuser_endpoint(password, dbname),
            Server::Docker(c) => c.superuser_endpoint(password, dbname),
            // keepd's superuser there is the operator's administrator.
            Server::External(c) => c.admin_endpoint(dbname),
        }
    }

    /// What to change when the server's major is not
    /// `database.postgres.version`.
    pub fn version_hint(&self) -> &'static str {
        match self {
            Server::Native(_) => "set database.postgres.native.bin_dir or upgrade the cluster",
            Server::Docker(_) => "use an image of that major in database.postgres.docker.image",
            Server::External(_) => {
                "point database.postgres.external at a server of that major, or unset the version"
            }
        }
    }

    /// Whether the superuser is keepd's own (its password in db.enc, which
    /// keepd may rotate) rather than an external server's administrator.
    pub fn superuser_is_keepds(&self) -> bool {
        match self {
            Server::Native(_) | Server::Docker(_) => true,
            Server::External(_) => false,
        }
    }

    /// The address the server certificate must name, in TCP mode.
    pub fn tls_address(&self) -> Option<IpAddr> {
        match self {
            Server::Native(c) => c.tls_address(),
            Server::Docker(c) => c.tls_address(),
            Server::External(_) => None,
        }
    }

    /// Installs a renewed server certificate where Postgres reads it.
    pub fn install_tls(&self, pki: &NodePki) -> Result<(), ProviderError> {
        match self {
            Server::Native(c) => Ok(c.install_tls(pki)?),
            Server::Docker(c) => Ok(c.install_server_tls(pki)?),
            Server::External(_) => Ok(()),
        }
    }

    /// The directory of the server's log files when keepd runs the server
    /// on this host (native), for the janitor's retention.
    pub fn own_log_dir(&self) -> Option<std::path::PathBuf> {
        match self {
            Server::Native(c) => Some(c.log_dir().to_owned()),
            Server::Docker(_) | Server::External(_) => None,
        }
    }

    /// Where the operator finds the server's own log.
    pub fn where_to_look(&self) -> String {
        match self {
            Server::Native(c) => c.log_dir().display().to_string(),
            Server::Docker(c) => format!("docker logs {}", c.container_name()),
            Server::External(c) => format!("the log of {}", c.describe()),
        }
    }
}

/// A started server.
pub(super) enum Running {
    Process(Postmaster, Arc<NativeCluster>),
    Container(Arc<DockerCluster>),
    External,
}

impl Running {
    /// Why it is not running any more, or None while it runs.
    pub(super) async fn exited(&self) -> Option<String> {
        match self {
            Running::Process(postmaster, _) => postmaster.exited().map(|s| s.to_string()),
            Running::Container(cluster) => cluster.exited().await,
            Running::External => None,
        }
    }

    pub(super) async fn stop(&self) {
        match self {
            Running::Process(postmaster, cluster) => {
                postmaster.stop(cluster.shutdown_timeout).await
            }
            Running::Container(cluster) => cluster.stop().await,
            Running::External => {}
        }
    }
}

/// The running postmaster. Signals are sent only while holding the lock
/// and after checking it has not been reaped, so a recycled PID is never hit.
pub(super) struct Postmaster {
    pid: u32,
    child: Arc<Mutex<Child>>,
}

impl Postmaster {
    fn new(mut child: Child) -> Postmaster {
        if let Some(stderr) = child.stderr.take() {
            // Before the logging collector takes over, and when it cannot
            // start, Postgres speaks on stderr: one log event per line.
            let _ = std::thread::Builder::new()
                .name("postgres-stderr".into())
                .spawn(move || {
                    for line in std::io::BufReader::new(stderr)
                        .lines()
                        .map_while(Result::ok)
                    {
                        info!(target: "postgres", "{line}");
                    }
                });
        }
        Postmaster {
            pid: child.id(),
            child: Arc::new(Mutex::new(child)),
        }
    }

    fn exited(&self) -> Option<ExitStatus> {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        child.try_wait().ok().flatten()
    }

    fn signal(&self, signal: Signal) -> bool {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if child.try_wait().ok().flatten().is_some() {
            return false;
        }
        kill(Pid::from_raw(self.pid as i32), signal).is_ok()
    }

    /// SIGINT (fast shutdown), then SIGQUIT (immediate), then SIGKILL.
    async fn stop(&self, timeout: Duration) {
        for (signal, wait) in stop_ladder(timeout) {
            if !self.signal(signal) {
                return;
            }
            if signal != Signal::SIGINT {
                warn!(
                    pid = self.pid,
                    ?signal,
                    "postgres did not stop in time; escalating"
                );
            }
            let deadline = Instant::now() + wait;
            while Instant::now() < deadline {
                if self.exited().is_some() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}
