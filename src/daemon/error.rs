//! Why `keepd run` stopped: one error type for the daemon's stages.

use std::path::PathBuf;

use crate::backup::BackupError;
use crate::cluster::ClusterError;
use crate::edge::{ApiTlsError, EdgeError};
use crate::identity::IdentityError;
use crate::passwords::PasswordError;
use crate::postgres::bootstrap::BootstrapError;
use crate::postgres::describe_error;
use crate::postgres::migrate::MigrateError;
use crate::postgres::render::RenderError;
use crate::postgres::server::ProviderError;
use crate::secrets::store::StoreError;
use crate::secrets::values::EntropyError;
use crate::state_lock::StateError;

use super::rotator::RotationError;

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
        "database.postgres.version asks for PostgreSQL {wanted}, but the server keepd reached runs \
         {running}: {hint}"
    )]
    ServerVersion {
        wanted: u32,
        running: u32,
        hint: &'static str,
    },
    #[error("cannot read or make the cluster's field key versions (keepd.field_keys): {}", describe_error(.0))]
    FieldKeys(#[source] tokio_postgres::Error),
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
    #[error(
        "cluster.join_token_file {path}: {reason}; write the token `keepd cluster token create` \
         printed into it, or unset the setting to be admitted by an operator"
    )]
    JoinToken { path: PathBuf, reason: String },
}

impl DaemonError {
    /// A setting that cannot work as written (exit 2), not a failure at
    /// run time.
    pub fn is_configuration(&self) -> bool {
        match self {
            DaemonError::ApiTls(_)
            | DaemonError::Edge(_)
            | DaemonError::ServerVersion { .. }
            | DaemonError::JoinToken { .. } => true,
            DaemonError::Identity(e) => e.is_configuration(),
            DaemonError::Provider(crate::postgres::server::ProviderError::Native(e)) => {
                e.is_configuration()
            }
            _ => false,
        }
    }
}
