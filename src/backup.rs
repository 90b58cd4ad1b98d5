//! Backups with pgBackRest: continuous WAL archiving (Postgres runs
//! `archive-push`, configured by `render`), full and differential backups,
//! the repository's contents and its verification.
//!
//! pgBackRest always runs as Postgres's account, with an empty environment
//! but for the repository passphrase, an S3 repository's access key and
//! the superuser's password, all unsealed from db.enc: none is ever in a
//! file or on a command line.
//! The repository is encrypted (AES-256-CBC, pgBackRest's own), so without
//! the node identity (or its Shamir shares) a stolen copy is useless.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::config::{Config, Provider};
use crate::postgres::native::{NativeError, PgAccount};
use crate::postgres::render::{BackupInputs, PGBACKREST, STANZA};
use crate::postgres::tls::Endpoint;
use crate::secrets::store::Credentials;
use crate::secrets::values::SecretString;

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

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("neither backup.repository nor backup.s3 is set: keepd takes no backups")]
    NotConfigured,
    #[error(
        "db.enc holds no repository passphrase yet: start keepd once with backup.repository or \
         backup.s3 set"
    )]
    NoPassphrase,
    #[error(
        "backup.s3 is set but db.enc holds no S3 access key: stop keepd, run `keepd backup \
         s3-credentials --key-id ID` (the secret on stdin) and start it again"
    )]
    NoS3Key,
    #[error(transparent)]
    Account(#[from] NativeError),
    #[error(
        "--to {0:?} is not a moment keepd can restore to: write it as `YYYY-MM-DD HH:MM:SS` with \
         an offset, e.g. `2026-12-01 14:05:00+00`"
    )]
    BadTarget(String),
    #[error("cannot run {PGBACKREST}: {0} (Debian: apt install pgbackrest)")]
    Spawn(std::io::Error),
    #[error("cannot run pgBackRest in the server container: {0}")]
    Container(String),
    #[error("pgBackRest {action} failed: {message}")]
    Failed {
        action: &'static str,
        message: String,
    },
}

impl BackupError {
    /// A setting or argument keepd cannot work with (exit 2).
    pub fn is_configuration(&self) -> bool {
        matches!(self, BackupError::NotConfigured | BackupError::BadTarget(_))
    }
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

/// How far `keepd restore` replays the WAL archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreTarget {
    /// To its end: everything archived.
    Latest,
    /// To this moment (Postgres's timestamp syntax, e.g.
    /// `2026-12-01 14:05:00+00`): commits up to it, none after.
    Time(String),
}

impl RestoreTarget {
    /// `YYYY-MM-DD HH:MM:SS[.fraction]` and an explicit offset (`+00`,
    /// `+01:00`, `-05`, or `Z`): checked before anything is restored, since
    /// a moment Postgres cannot read fails only after the data directory
    /// was overwritten.
    pub fn time(text: &str) -> Result<RestoreTarget, BackupError> {
        let bad = || BackupError::BadTarget(text.to_string());
        let (date, rest) = text.trim().split_once([' ', 'T']).ok_or_else(bad)?;
        let digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
        let parts: Vec<&str> = date.split('-').collect();
        if !(parts.len() == 3 && digits(parts[0], 4) && digits(parts[1], 2) && digits(parts[2], 2))
        {
            return Err(bad());
        }
        let (clock, offset) = match rest.strip_suffix('Z') {
            Some(clock) => (clock, "+00".to_string()),
            None => {
                let at = rest.rfind(['+', '-']).ok_or_else(bad)?;
                (&rest[..at], rest[at..].to_string())
            }
        };
        let (hms, fraction) = clock.split_once('.').unwrap_or((clock, "0"));
        let hms: Vec<&str> = hms.split(':').collect();
        let offset_ok = {
            let o: Vec<&str> = offset[1..].split(':').collect();
            digits(o[0], 2) && (o.len() == 1 || (o.len() == 2 && digits(o[1], 2)))
        };
        if !(hms.len() == 3
            && hms.iter().all(|p| digits(p, 2))
            && !fraction.is_empty()
            && fraction.bytes().all(|b| b.is_ascii_digit())
            && offset_ok)
        {
            return Err(bad());
        }
        Ok(RestoreTarget::Time(format!("{date} {clock}{offset}")))
    }
}

impl RestoreTarget {
    /// pgBackRest's restore options for this target.
    fn options(&self) -> Vec<String> {
        match self {
            RestoreTarget::Latest => vec!["--delta".into()],
            RestoreTarget::Time(time) => vec![
                "--delta".into(),
                "--type=time".into(),
                format!("--target={time}"),
                "--target-action=promote".into(),
            ],
        }
    }
}

impl std::fmt::Display for RestoreTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RestoreTarget::Latest => f.write_str("the end of the WAL archive"),
            RestoreTarget::Time(t) => write!(f, "{t}"),
        }
    }
}

/// pgBackRest for this node's cluster: on this host as Postgres's account
/// (native), or inside the node's server container (docker).
pub struct PgBackRest {
    /// Its configuration, as the pgBackRest that runs sees the path.
    conf: PathBuf,
    runner: Runner,
    env: RepositoryEnv,
    superuser: SecretString,
}

enum Runner {
    Local(Option<PgAccount>),
    /// `docker exec` in this node's server container.
    Container {
        node_id: String,
    },
}

impl PgBackRest {
    /// With db.enc's repository passphrase (and S3 key), and the
    /// superuser's password pgBackRest logs in with to start and stop a
    /// backup.
    pub fn new(
        config: &Config,
        credentials: &Credentials,
        node_id: &str,
    ) -> Result<PgBackRest, BackupError> {
        if !config.backup.enabled() {
            return Err(BackupError::NotConfigured);
        }
        if credentials.backup_passphrase.is_none() {
            return Err(BackupError::NoPassphrase);
        }
        if config.backup.s3.is_some() && credentials.s3.is_none() {
            return Err(BackupError::NoS3Key);
        }
        let runner = match config.database.postgres.provider {
            Provider::Docker => Runner::Container {
                node_id: node_id.to_string(),
            },
            Provider::Native | Provider::External => {
                Runner::Local(PgAccount::resolve(&config.database.postgres.native.run_as)?)
            }
        };
        Ok(PgBackRest {
            conf: BackupInputs::of(config).conf,
            runner,
            env: RepositoryEnv::of(credentials),
            superuser: credentials.superuser.clone(),
        })
    }

    fn args(&self, action: &str, extra: &[&str]) -> Vec<String> {
        let mut args = vec![
            format!("--config={}", self.conf.display()),
            format!("--stanza={STANZA}"),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        args.push(action.to_string());
        args
    }

    fn local(&self, account: Option<&PgAccount>, action: &str, extra: &[&str]) -> Command {
        let mut cmd = Command::new(PGBACKREST);
        cmd.env_clear().env("LC_ALL", "C");
        self.env.apply(&mut cmd);
        cmd.env("PGPASSWORD", self.superuser.expose())
            .current_dir("/")
            .args(self.args(action, extra))
            .stdin(Stdio::null());
        if let Some(account) = account {
            use std::os::unix::process::CommandExt;
            cmd.uid(account.uid.as_raw()).gid(account.gid.as_raw());
        }
        cmd
    }

    /// Runs `action`; its output, or an error with it. Dropping the
    /// future kills a local pgBackRest (keepd stopping never waits for a
    /// backup); one in a container ends with the container.
    async fn run(
        &self,
        action: &'static str,
        extra: &[&str],
        echo: bool,
    ) -> Result<String, BackupError> {
        match &self.runner {
            Runner::Local(account) => {
                let mut command = self.local(account.as_ref(), action, extra);
                if echo {
                    command.stdout(Stdio::inherit()).stderr(Stdio::inherit());
                }
                let out = tokio::process::Command::from(command)
                    .kill_on_drop(true)
                    .output()
                    .await
                    .map_err(BackupError::Spawn)?;
                checked(action, out)
            }
            Runner::Container { node_id } => {
                let mut cmd = vec![PGBACKREST.to_string()];
                cmd.extend(self.args(action, extra));
                let mut env = self.env.docker_env();
                env.push(format!("PGPASSWORD={}", self.superuser.expose()));
                env.push("LC_ALL=C".into());
                let (code, output) =
                    crate::postgres::docker::exec_in_server(node_id, cmd, env, echo)
                        .await
                        .map_err(|e| BackupError::Container(e.to_string()))?;
                match code {
                    0 => Ok(output),
                    code => Err(BackupError::Failed {
                        action,
                        message: format!("exited with {code}: {}", output.trim()),
                    }),
                }
            }
        }
    }

    /// Creates the stanza in the repository if it is not there (every
    /// start: cheap, and it checks the repository and the archive).
    pub async fn stanza_create(&self) -> Result<(), BackupError> {
        self.run("stanza-create", &[], false).await.map(drop)
    }

    /// Takes a backup for the schedule.
    pub async fn backup_in_background(&self, kind: BackupKind) -> Result<(), BackupError> {
        let kind = format!("--type={}", kind.name());
        self.run("backup", &[&kind], false).await.map(drop)
    }

    /// Takes a backup, printing pgBackRest's progress lines (the CLI).
    pub async fn backup(&self, kind: BackupKind) -> Result<(), BackupError> {
        let kind = format!("--type={}", kind.name());
        self.run("backup", &[&kind, "--log-level-console=info"], true)
            .await
            .map(drop)
    }

    /// The repository's backups and WAL archive, as pgBackRest reports
    /// them (`--output=json` for programs).
    pub async fn info(&self, json: bool) -> Result<String, BackupError> {
        match json {
            true => self.run("info", &["--output=json"], false).await,
            false => self.run("info", &[], false).await,
        }
    }

    /// A restore's command line (in place, only what differs, from the
    /// latest backup before the target; Postgres then replays the archive
    /// to it and promotes), for the docker provider's one-off container.
    pub fn restore_command(&self, target: &RestoreTarget) -> Vec<String> {
        let options = target.options();
        let options: Vec<&str> = options.iter().map(String::as_str).collect();
        let mut cmd = vec![PGBACKREST.to_string()];
        cmd.extend(self.args("restore", &options));
        cmd
    }

    /// Restores the data directory on this host (native; Postgres
    /// stopped).
    pub async fn restore(&self, target: &RestoreTarget) -> Result<(), BackupError> {
        let options = target.options();
        let options: Vec<&str> = options.iter().map(String::as_str).collect();
        self.run("restore", &options, false).await.map(drop)
    }

    /// What pgBackRest reads from its environment, for a container that
    /// runs it.
    pub fn env(&self) -> &RepositoryEnv {
        &self.env
    }

    /// Checks every file of every backup and the WAL archive against the
    /// checksums in the repository's manifests.
    pub async fn verify(&self) -> Result<String, BackupError> {
        self.run("verify", &[], false).await
    }
}

/// Where the repository keeps a copy of db.enc: sealed to the identity, so
/// safe beside the backups, and what a restore onto a fresh state
/// directory opens with the identity rebuilt from its Shamir shares.
pub fn credentials_copy(repository: &Path) -> PathBuf {
    repository.join("keepd-db.enc")
}

/// What the repository holds, from `pgbackrest info --output=json`: when
/// the newest full backup and the newest backup of any kind finished.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackupStatus {
    pub last_full: Option<u64>,
    pub last_any: Option<u64>,
}

impl BackupStatus {
    pub fn from_info(json: &str) -> Result<BackupStatus, BackupError> {
        let bad = |why: String| BackupError::Failed {
            action: "info",
            message: format!("unexpected output: {why}"),
        };
        let info: serde_json::Value = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
        let mut status = BackupStatus::default();
        let backups = info
            .as_array()
            .and_then(|stanzas| stanzas.first())
            .and_then(|stanza| stanza["backup"].as_array())
            .cloned()
            .unwrap_or_default();
        for backup in backups {
            let Some(stop) = backup["timestamp"]["stop"].as_u64() else {
                return Err(bad("a backup without timestamp.stop".into()));
            };
            status.last_any = status.last_any.max(Some(stop));
            if backup["type"] == "full" {
                status.last_full = status.last_full.max(Some(stop));
            }
        }
        Ok(status)
    }

    /// The backup the schedule asks for at `now` (unix seconds), if any: a
    /// full one when there is none or the newest is `full_interval` old, a
    /// differential when the newest of any kind is `diff_interval` old.
    pub fn due(&self, now: u64, full_interval: u64, diff_interval: u64) -> Option<BackupKind> {
        let age = |at: Option<u64>| at.map(|t| now.saturating_sub(t));
        match (age(self.last_full), age(self.last_any)) {
            (None, _) => Some(BackupKind::Full),
            (Some(full), _) if full >= full_interval => Some(BackupKind::Full),
            (_, Some(any)) if any >= diff_interval => Some(BackupKind::Differential),
            _ => None,
        }
    }
}

/// Closes the current WAL segment and waits (up to 10 s) until Postgres has
/// archived it: then everything committed so far is in the repository.
/// Returns the segment's name.
pub async fn archive_current_wal(superuser: &Endpoint) -> Result<String, BackupError> {
    let failed = |e: tokio_postgres::Error| BackupError::Failed {
        action: "archive of the current WAL segment",
        message: crate::postgres::describe_error(&e),
    };
    let client = superuser.connect().await.map_err(failed)?;
    let segment: String = client
        .query_one("SELECT pg_walfile_name(pg_switch_wal())", &[])
        .await
        .map_err(failed)?
        .get(0);
    for _ in 0..100 {
        let done: bool = client
            .query_one(
                "SELECT coalesce(last_archived_wal >= $1, false) FROM pg_stat_archiver",
                &[&segment],
            )
            .await
            .map_err(failed)?
            .get(0);
        if done {
            return Ok(segment);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Err(BackupError::Failed {
        action: "archive of the current WAL segment",
        message: format!("{segment} was not archived within 10 s"),
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_targets_need_a_whole_moment_with_an_offset() {
        for (given, wanted) in [
            ("2026-12-01 14:05:00+00", "2026-12-01 14:05:00+00"),
            (
                "2026-12-01T14:05:00.123456Z",
                "2026-12-01 14:05:00.123456+00",
            ),
            ("2026-12-01 14:05:00-05:30", "2026-12-01 14:05:00-05:30"),
        ] {
            assert_eq!(
                RestoreTarget::time(given).unwrap(),
                RestoreTarget::Time(wanted.into())
            );
        }
        for bad in [
            "yesterday",
            "2026-12-01",
            "2026-12-01 14:05:00",
            "2026-12-01 14:05+00",
            "2026-12-01 14:05:00+0",
            "2026-12-1 14:05:00+00",
            "2026-12-01 14:05:00.+00",
        ] {
            assert!(RestoreTarget::time(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_schedule_asks_for_full_then_differential_backups() {
        let json = r#"[{"name":"keepd","backup":[
            {"type":"full","timestamp":{"start":900,"stop":1000}},
            {"type":"diff","timestamp":{"start":1900,"stop":2000}}]}]"#;
        let status = BackupStatus::from_info(json).unwrap();
        assert_eq!(
            status,
            BackupStatus {
                last_full: Some(1000),
                last_any: Some(2000)
            }
        );
        let (full, diff) = (10_000, 3_000);
        assert_eq!(status.due(2_500, full, diff), None);
        assert_eq!(
            status.due(5_000, full, diff),
            Some(BackupKind::Differential)
        );
        assert_eq!(status.due(11_000, full, diff), Some(BackupKind::Full));
        let empty = BackupStatus::from_info(r#"[{"name":"keepd","backup":[]}]"#).unwrap();
        assert_eq!(empty.due(0, full, diff), Some(BackupKind::Full));
        assert!(BackupStatus::from_info("not json").is_err());
    }
}
