//! Backups with pgBackRest: continuous WAL archiving (Postgres runs
//! `archive-push`, configured by `render`), full and differential backups,
//! the repository's contents and its verification.
//!
//! pgBackRest always runs as Postgres's account, with an empty environment
//! but for the repository passphrase and the superuser's password, both
//! unsealed from db.enc: neither is ever in a file or on a command line.
//! The repository is encrypted (AES-256-CBC, pgBackRest's own), so without
//! the node identity (or its Shamir shares) a stolen copy is useless.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use crate::config::{Config, Layout};
use crate::postgres::native::{NativeError, PgAccount};
use crate::postgres::render::{PGBACKREST, STANZA};
use crate::secrets::values::SecretString;

/// The variable pgBackRest reads the repository passphrase from.
pub const PASSPHRASE_ENV: &str = "PGBACKREST_REPO1_CIPHER_PASS";

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("backup.repository is not set: keepd takes no backups")]
    NotConfigured,
    #[error(
        "db.enc holds no repository passphrase yet: start keepd once with backup.repository set"
    )]
    NoPassphrase,
    #[error(transparent)]
    Account(#[from] NativeError),
    #[error("cannot run {PGBACKREST}: {0} (Debian: apt install pgbackrest)")]
    Spawn(std::io::Error),
    #[error("pgBackRest {action} failed: {message}")]
    Failed {
        action: &'static str,
        message: String,
    },
}

/// A backup's kind, as pgBackRest names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackupKind {
    Full,
    Differential,
}

impl BackupKind {
    fn name(self) -> &'static str {
        match self {
            BackupKind::Full => "full",
            BackupKind::Differential => "diff",
        }
    }
}

/// pgBackRest for this node's cluster.
pub struct PgBackRest {
    conf: PathBuf,
    account: Option<PgAccount>,
    passphrase: SecretString,
    superuser: SecretString,
}

impl PgBackRest {
    /// `passphrase` is the repository's, `superuser` the password pgBackRest
    /// logs in with to start and stop a backup.
    pub fn new(
        config: &Config,
        passphrase: Option<&SecretString>,
        superuser: &SecretString,
    ) -> Result<PgBackRest, BackupError> {
        if config.backup.repository.is_none() {
            return Err(BackupError::NotConfigured);
        }
        Ok(PgBackRest {
            conf: Layout::of(config).pgbackrest_conf(),
            account: PgAccount::resolve(&config.database.postgres.native.run_as)?,
            passphrase: passphrase.ok_or(BackupError::NoPassphrase)?.clone(),
            superuser: superuser.clone(),
        })
    }

    fn command(&self, action: &str, extra: &[&str]) -> Command {
        let mut cmd = Command::new(PGBACKREST);
        cmd.env_clear()
            .env("LC_ALL", "C")
            .env(PASSPHRASE_ENV, self.passphrase.expose())
            .env("PGPASSWORD", self.superuser.expose())
            .current_dir("/")
            .arg(format!("--config={}", self.conf.display()))
            .arg(format!("--stanza={STANZA}"))
            .args(extra)
            .arg(action)
            .stdin(Stdio::null());
        if let Some(account) = &self.account {
            use std::os::unix::process::CommandExt;
            cmd.uid(account.uid.as_raw()).gid(account.gid.as_raw());
        }
        cmd
    }

    fn run(&self, action: &'static str, extra: &[&str]) -> Result<String, BackupError> {
        let out = self
            .command(action, extra)
            .output()
            .map_err(BackupError::Spawn)?;
        checked(action, out)
    }

    /// Creates the stanza in the repository if it is not there (every
    /// start: cheap, and it checks the repository and the archive).
    pub fn stanza_create(&self) -> Result<(), BackupError> {
        self.run("stanza-create", &[]).map(drop)
    }

    /// Takes a backup, printing pgBackRest's progress lines to stdout when
    /// `progress` (the CLI) and keeping them otherwise (the schedule).
    pub fn backup(&self, kind: BackupKind, progress: bool) -> Result<String, BackupError> {
        let kind = format!("--type={}", kind.name());
        if !progress {
            return self.run("backup", &[&kind]);
        }
        let status = self
            .command("backup", &[&kind, "--log-level-console=info"])
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .status()
            .map_err(BackupError::Spawn)?;
        if status.success() {
            Ok(String::new())
        } else {
            Err(BackupError::Failed {
                action: "backup",
                message: format!("exited with {status} (its output is above)"),
            })
        }
    }

    /// The repository's backups and WAL archive, as pgBackRest reports
    /// them (`--output=json` for programs).
    pub fn info(&self, json: bool) -> Result<String, BackupError> {
        if json {
            self.run("info", &["--output=json"])
        } else {
            self.run("info", &[])
        }
    }

    /// Checks every file of every backup and the WAL archive against the
    /// checksums in the repository's manifests.
    pub fn verify(&self) -> Result<String, BackupError> {
        self.run("verify", &[])
    }
}

fn checked(action: &'static str, out: Output) -> Result<String, BackupError> {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        return Ok(stdout);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let message = [stderr.trim(), stdout.trim()]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    Err(BackupError::Failed {
        action,
        message: if message.is_empty() {
            format!("exited with {}", out.status)
        } else {
            message
        },
    })
}
