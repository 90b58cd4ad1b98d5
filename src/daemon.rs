//! `keepd run`: wires the modules together in the one direction data flows
//! (config → render → provision → bootstrap → api) and handles signals.

use std::future::IntoFuture;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::api::{self, ApiState, HealthProbe};
use crate::config::{Config, Provider};
use crate::identity::{IdentityError, NodeIdentity};
use crate::postgres::DATABASE;
use crate::postgres::bootstrap::{self, BootstrapError};
use crate::postgres::native::{NativeCluster, NativeError};
use crate::postgres::render::{self, RenderError};
use crate::postgres::supervise::Supervisor;
use crate::secret::{self, EntropyError, ScramVerifier};
use crate::state::{StateError, StateLock};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Render(#[from] RenderError),
    #[error(transparent)]
    Native(#[from] NativeError),
    #[error(transparent)]
    Bootstrap(#[from] BootstrapError),
    #[error(transparent)]
    Entropy(#[from] EntropyError),
    #[error(
        "database.postgres.provider = {provider} is not available in this build yet; \
         use provider: native"
    )]
    ProviderUnavailable { provider: Provider },
    #[error(
        "network.use_unix_socket = false needs TLS certificates for Postgres, which this build \
         cannot issue yet; use network.use_unix_socket: true"
    )]
    TcpUnavailable,
    #[error(
        "Postgres did not accept connections within {seconds}s; its log is in {log_dir}, and \
         database.postgres.native.start_timeout sets the limit"
    )]
    StartTimeout { seconds: u64, log_dir: PathBuf },
    #[error("cannot listen on api.listen = {addr}: {source}; choose a free address and port")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("the API server failed: {0}")]
    Serve(std::io::Error),
    #[error("a startup task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Runs until SIGTERM or SIGINT; Postgres is stopped before this returns.
pub async fn run(config_path: &Path, config: Config) -> Result<(), DaemonError> {
    let pg = &config.database.postgres;
    if pg.provider != Provider::Native {
        return Err(DaemonError::ProviderUnavailable {
            provider: pg.provider,
        });
    }
    if !config.network.use_unix_socket {
        return Err(DaemonError::TcpUnavailable);
    }
    let _lock = StateLock::acquire(&config.node.state_dir)?;
    let identity_path = config.node.state_dir.join("identity.key");
    let (identity, created) = NodeIdentity::load_or_create(&identity_path)?;
    let node_id = identity.node_id().to_string();
    info!(
        node_id,
        created,
        path = %identity_path.display(),
        "node identity loaded"
    );

    let rendered = render::render(&config)?;
    let cluster = {
        let (config, rendered) = (config.clone(), rendered.clone());
        tokio::task::spawn_blocking(move || NativeCluster::prepare(&config, &rendered)).await??
    };
    let cluster = Arc::new(cluster);

    // A fresh superuser password every start, known only to this process;
    // Postgres receives its SCRAM verifier, never the password.
    let password = secret::generate_password(config.credentials.password_length)?;
    {
        let cluster = cluster.clone();
        let verifier = ScramVerifier::of(&password);
        tokio::task::spawn_blocking(move || {
            cluster.clear_stale_pid()?;
            cluster.set_superuser_verifier(&verifier)
        })
        .await??;
    }
    let maintenance = cluster.superuser_config(&password, "postgres");
    let keepd_db = cluster.superuser_config(&password, DATABASE);
    let supervisor = Supervisor::start(cluster.clone(), maintenance.clone());

    let started = async {
        if !supervisor.wait_ready(cluster.start_timeout).await {
            return Err(DaemonError::StartTimeout {
                seconds: cluster.start_timeout.as_secs(),
                log_dir: cluster.data_dir().join("log"),
            });
        }
        bootstrap::apply(&maintenance, &keepd_db, &rendered).await?;
        let listener = tokio::net::TcpListener::bind(config.api.listen)
            .await
            .map_err(|source| DaemonError::Listen {
                addr: config.api.listen,
                source,
            })?;
        Ok(listener)
    };
    let listener = match started.await {
        Ok(listener) => listener,
        Err(e) => {
            supervisor.stop().await;
            return Err(e);
        }
    };
    let addr = listener.local_addr().map_err(DaemonError::Serve)?;
    let health = Arc::new(HealthProbe::new(supervisor.state(), keepd_db));
    let app = api::router(ApiState {
        health,
        node_id: node_id.clone(),
    });
    info!(%addr, node_id, "api listening");

    let (shutdown_tx, mut shutdown_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = shutdown_rx.wait_for(|s| *s).await;
            })
            .into_future(),
    );

    let outcome = wait_for_shutdown(config_path).await;
    info!("shutting down");
    let _ = shutdown_tx.send(true);
    match server.await {
        Ok(Err(e)) => error!(error = %e, "api server failed"),
        Err(e) => error!(error = %e, "api server task failed"),
        Ok(Ok(())) => {}
    }
    supervisor.stop().await;
    info!("keepd stopped");
    outcome
}

/// Returns on SIGTERM or SIGINT. SIGHUP re-reads the configuration: a
/// broken file is reported and the running configuration kept.
async fn wait_for_shutdown(config_path: &Path) -> Result<(), DaemonError> {
    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    let mut hup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;
    loop {
        tokio::select! {
            _ = term.recv() => { info!(signal = "SIGTERM", "stop requested"); return Ok(()); }
            _ = int.recv() => { info!(signal = "SIGINT", "stop requested"); return Ok(()); }
            _ = hup.recv() => match Config::load(config_path) {
                Ok(_) => warn!(
                    path = %config_path.display(),
                    "SIGHUP: the configuration is valid; changed settings take effect at the next restart"
                ),
                Err(e) => {
                    error!(error = %e, "SIGHUP: the new configuration is invalid; keeping the running one");
                }
            },
        }
    }
}
