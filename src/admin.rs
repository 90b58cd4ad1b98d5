//! Operator commands that talk to the managed database directly, with
//! credentials unsealed from `db.enc` in memory: `keepd psql` and
//! `keepd audit verify`.

use std::path::PathBuf;
use std::process::{Command, ExitStatus};

use crate::audit::Verdict;
use crate::config::Config;
use crate::identity::{IdentityError, NodeIdentity};
use crate::postgres::native::PgBinaries;
use crate::postgres::render::socket_dir;
use crate::postgres::{DATABASE, SUPERUSER, roles};
use crate::secrets::store::{CredentialStore, Credentials, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("no sealed credentials at {0} yet: start keepd once with `keepd run` first")]
    NoCredentials(PathBuf),
    #[error(
        "--role {given} is not a role keepd can log in as; use `superuser`, `login` (the active \
         login role) or one of: {choices}"
    )]
    UnknownRole { given: String, choices: String },
    #[error(
        "cannot connect to keepd's Postgres: {}; is keepd running with this configuration?",
        crate::postgres::describe_error(.0)
    )]
    Connect(#[source] tokio_postgres::Error),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },
}

/// The node identity and its unsealed credentials; never creates either.
fn unseal(config: &Config) -> Result<(NodeIdentity, Credentials), AdminError> {
    let identity = NodeIdentity::load(&config.node.state_dir.join("identity.key"))?;
    let store = CredentialStore::new(config.credentials_path());
    let (credentials, _) = store
        .load(&identity)?
        .ok_or_else(|| AdminError::NoCredentials(store.path().to_owned()))?;
    Ok((identity, credentials))
}

/// `keepd audit verify`: recomputes the audit chain as the superuser.
pub async fn audit_verify(config: &Config) -> Result<Verdict, AdminError> {
    let (identity, credentials) = unseal(config)?;
    let mut pg = tokio_postgres::Config::new();
    pg.host_path(socket_dir(config))
        .port(config.network.port)
        .dbname(DATABASE)
        .user(SUPERUSER)
        .password(credentials.superuser.expose())
        .application_name("keepd-audit-verify");
    let (client, connection) = pg
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(AdminError::Connect)?;
    tokio::spawn(connection);
    let checkpoint = crate::audit::checkpoint_path(&config.node.state_dir);
    Ok(crate::audit::verify(&client, &identity, &checkpoint).await?)
}

/// Runs psql as `role` (`superuser` when None) with `args`, and returns
/// its exit status. The password reaches psql through its environment
/// (readable only by the same user and root), never argv.
pub fn psql(
    config: &Config,
    role: Option<&str>,
    args: &[String],
) -> Result<ExitStatus, AdminError> {
    let (identity, credentials) = unseal(config)?;
    let node = identity.node_id();
    let live: Vec<(String, _)> = credentials
        .live()
        .filter_map(|c| Some((roles::login_role_name(node, c.version), c.password.clone()?)))
        .collect();
    let (user, password) = match role.unwrap_or("superuser") {
        "superuser" | SUPERUSER => (SUPERUSER.to_string(), credentials.superuser.clone()),
        "login" => {
            let active = credentials
                .active()
                .and_then(|c| Some((roles::login_role_name(node, c.version), c.password.clone()?)));
            active.ok_or_else(|| AdminError::NoCredentials(config.credentials_path()))?
        }
        other => live
            .iter()
            .find(|(name, _)| name == other)
            .cloned()
            .ok_or_else(|| AdminError::UnknownRole {
                given: other.into(),
                choices: live
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })?,
    };
    let pg = &config.database.postgres;
    let program = PgBinaries::locate(pg.native.bin_dir.as_deref(), pg.version)
        .ok()
        .map(|b| b.dir.join("psql"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("psql"));
    Command::new(&program)
        .args(args)
        .env("PGHOST", socket_dir(config))
        .env("PGPORT", config.network.port.to_string())
        .env("PGDATABASE", DATABASE)
        .env("PGUSER", &user)
        .env("PGPASSWORD", password.expose())
        .env("PGAPPNAME", "keepd-psql")
        .status()
        .map_err(|source| AdminError::Spawn { program, source })
}
