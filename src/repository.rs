//! The backup repository as pgBackRest is told about it: where it is and
//! where pgBackRest finds the cluster (`BackupInputs`, `Repository`), its
//! `pgbackrest.conf` (`conf`), and what pgBackRest reads from its
//! environment (`RepositoryEnv`: the passphrase and an S3 key, unsealed
//! from db.enc). Pure, and below the providers: the renderer writes the
//! configuration from it, the providers hand the postmaster the
//! environment (for `archive-push`), and `backup`, above `postgres`, runs
//! pgBackRest with both.
//!
//! What it does not know: how pgBackRest is run (on the host, or in the
//! server's container: `postgres::CommandRunner`), or the schedule.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::config::{Config, Layout, Provider, S3Config, container};
use crate::secrets::store::Credentials;
use crate::secrets::values::SecretString;

/// A path that cannot be written unquoted into pgBackRest's configuration
/// or Postgres's archive command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{key}` = {value:?} cannot be written into pgBackRest's configuration: {reason}; choose another value"
)]
pub struct NotPlain {
    pub key: &'static str,
    pub value: String,
    pub reason: &'static str,
}

/// pgBackRest as Debian installs it (`postgresql.conf` names it whole:
/// Postgres runs the archive command without keepd's PATH).
pub const PGBACKREST: &str = "/usr/bin/pgbackrest";
/// The stanza: pgBackRest's name for keepd's cluster in the repository.
pub const STANZA: &str = "keepd";
/// The file name of pgBackRest's configuration.
pub const PGBACKREST_CONF: &str = "pgbackrest.conf";

/// Where pgBackRest keeps the backups and the WAL archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Repository {
    Directory(PathBuf),
    S3(S3Config),
}

/// What pgBackRest's configuration and Postgres's archive command need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupInputs {
    pub repository: Repository,
    pub retention_full: u32,
    pub data_dir: PathBuf,
    pub conf: PathBuf,
    pub lock_dir: PathBuf,
}

impl BackupInputs {
    /// The paths as pgBackRest sees them: the host's for native, the
    /// container's for docker (the repository mounted at
    /// `container::REPOSITORY`).
    pub fn of(config: &Config) -> BackupInputs {
        let retention_full = config.backup.retention_full;
        match config.database.postgres.provider {
            // A directory only: validation refuses a bucket, which the
            // container could not reach.
            Provider::Docker => BackupInputs {
                repository: Repository::Directory(container::REPOSITORY.into()),
                retention_full,
                data_dir: container::PGDATA.into(),
                conf: Path::new(container::CONF).join(PGBACKREST_CONF),
                lock_dir: container::PGBACKREST_RUN.into(),
            },
            Provider::Native | Provider::External => {
                let layout = Layout::of(config);
                BackupInputs {
                    repository: config
                        .backup
                        .repository
                        .clone()
                        .map(Repository::Directory)
                        .or_else(|| config.backup.s3.clone().map(Repository::S3))
                        .expect("backups enabled"),
                    retention_full,
                    data_dir: layout.data_dir(),
                    conf: layout.pgbackrest_conf(),
                    lock_dir: layout.pgbackrest_lock_dir(),
                }
            }
        }
    }
}

/// pgBackRest's configuration: the repository (encrypted; the passphrase
/// comes from the environment), the retention, and how to reach the
/// cluster (its data directory and socket, as keepd's superuser).
/// `socket` is the directory pgBackRest reaches the server's socket in,
/// as keepd's superuser `superuser` on `database`.
pub fn conf(
    backup: &BackupInputs,
    socket: &str,
    port: u16,
    superuser: &str,
    database: &str,
) -> Result<String, NotPlain> {
    let plain = plain_path;
    let mut out = String::new();
    let _ = writeln!(out, "[global]");
    match &backup.repository {
        Repository::Directory(dir) => {
            let _ = writeln!(out, "repo1-path={}", plain("backup.repository", dir)?);
        }
        // Names checked plain by the configuration's validation; the key
        // comes from the environment (db.enc), never this file.
        Repository::S3(s3) => {
            let (host, port) = s3.host_port();
            let _ = writeln!(out, "repo1-type=s3");
            let _ = writeln!(out, "repo1-path={}", s3.path);
            let _ = writeln!(out, "repo1-s3-endpoint={host}");
            let _ = writeln!(out, "repo1-storage-port={port}");
            let _ = writeln!(out, "repo1-s3-bucket={}", s3.bucket);
            let _ = writeln!(out, "repo1-s3-region={}", s3.region);
            let _ = writeln!(out, "repo1-s3-uri-style={}", s3.uri_style.as_str());
            if let Some(ca) = &s3.ca_file {
                let _ = writeln!(
                    out,
                    "repo1-storage-ca-file={}",
                    plain("backup.s3.ca_file", ca)?
                );
            }
        }
    }
    let _ = writeln!(out, "repo1-cipher-type=aes-256-cbc");
    let _ = writeln!(out, "repo1-retention-full={}", backup.retention_full);
    let run = plain("node.runtime_dir", &backup.lock_dir)?;
    let _ = writeln!(out, "lock-path={run}");
    let _ = writeln!(out, "spool-path={run}");
    let _ = writeln!(out, "log-level-console=warn");
    let _ = writeln!(out, "log-level-file=off");
    let _ = writeln!(out, "start-fast=y");
    let _ = writeln!(out, "\n[{STANZA}]");
    let _ = writeln!(
        out,
        "pg1-path={}",
        plain("node.state_dir", &backup.data_dir)?
    );
    let _ = writeln!(out, "pg1-socket-path={socket}");
    let _ = writeln!(out, "pg1-port={port}");
    let _ = writeln!(out, "pg1-user={superuser}");
    let _ = writeln!(out, "pg1-database={database}");
    Ok(out)
}

/// A path for pgBackRest's configuration and the archive command (which a
/// shell reads): plain characters only, so neither needs quoting.
pub fn plain_path<'a>(key: &'static str, path: &'a Path) -> Result<&'a str, NotPlain> {
    let unquotable = |reason| NotPlain {
        key,
        value: path.display().to_string(),
        reason,
    };
    let text = path
        .to_str()
        .ok_or_else(|| unquotable("it is not valid UTF-8"))?;
    // No `%`: Postgres expands %p and %f inside the archive command.
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+@:".contains(c);
    if !text.chars().all(plain) {
        return Err(unquotable(
            "pgBackRest's configuration and Postgres's archive command need a path of letters, \
             digits and / . _ - + @ : only",
        ));
    }
    Ok(text)
}

/// The variable pgBackRest reads the repository passphrase from.
pub const PASSPHRASE_ENV: &str = "PGBACKREST_REPO1_CIPHER_PASS";

/// What pgBackRest reads from its environment, unsealed from db.enc: the
/// repository passphrase and, for an S3 repository, its access key. The
/// postmaster gets it (for the archive command) and so does every
/// pgBackRest keepd runs; Debug names the variables only.
#[derive(Clone, Default)]
pub struct RepositoryEnv(Vec<(&'static str, SecretString)>);

impl std::fmt::Debug for RepositoryEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(name, _)| name))
            .finish()
    }
}

impl RepositoryEnv {
    pub fn of(credentials: &Credentials) -> RepositoryEnv {
        let mut vars = Vec::new();
        if let Some(passphrase) = &credentials.backup_passphrase {
            vars.push((PASSPHRASE_ENV, passphrase.clone()));
        }
        if let Some(s3) = &credentials.s3 {
            vars.push(("PGBACKREST_REPO1_S3_KEY", s3.key_id.clone()));
            vars.push(("PGBACKREST_REPO1_S3_KEY_SECRET", s3.secret.clone()));
        }
        RepositoryEnv(vars)
    }

    /// The variables: name and value.
    pub fn vars(&self) -> impl Iterator<Item = (&'static str, &SecretString)> {
        self.0.iter().map(|(name, value)| (*name, value))
    }

    /// The variables as the Docker Engine takes them (`NAME=value`).
    pub fn docker_env(&self) -> Vec<String> {
        self.0
            .iter()
            .map(|(name, value)| format!("{name}={}", value.expose()))
            .collect()
    }

    pub fn apply(&self, command: &mut Command) {
        for (name, value) in &self.0 {
            command.env(name, value.expose());
        }
    }
}

/// Where the repository keeps a copy of db.enc: sealed to the identity, so
/// safe beside the backups, and what a restore onto a fresh state
/// directory opens with the identity rebuilt from its Shamir shares.
pub fn credentials_copy(repository: &Path) -> PathBuf {
    repository.join("keepd-db.enc")
}
