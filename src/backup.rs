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

use std::path::PathBuf;

use crate::config::Config;
use crate::postgres::commands::{CommandRunner, RunError, RunOutput};
use crate::postgres::native::NativeError;
use crate::postgres::replay::{Replay, ReplayError};
use crate::postgres::tls::Endpoint;
use crate::repository::{BackupInputs, PGBACKREST, RepositoryEnv, STANZA};
use crate::secrets::store::Credentials;
use crate::secrets::values::{SecretString, SharedPassword};

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
        "--to {0:?} is not a moment keepd can restore to ({1}): write it as \
         `YYYY-MM-DD HH:MM:SS[.fraction]` and an offset (`+00`, `+05:30`, `-05` or `Z`), \
         e.g. `2026-12-01 14:05:00+00`"
    )]
    BadTarget(String, String),
    #[error("{0} (Debian: apt install pgbackrest)")]
    Run(#[from] RunError),
    #[error(transparent)]
    Replay(#[from] ReplayError),
    #[error("pgBackRest {action} failed: {message}")]
    Failed {
        action: &'static str,
        message: String,
    },
}

impl BackupError {
    /// A setting or argument keepd cannot work with (exit 2).
    pub fn is_configuration(&self) -> bool {
        matches!(
            self,
            BackupError::NotConfigured | BackupError::BadTarget(..)
        )
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
    /// To this moment: commits up to it, none after.
    Time(RestoreTime),
}

/// A moment `keepd restore --to` replays to, read by [`RestoreTarget::time`]
/// (so one that does not exist never reaches pgBackRest); it displays in
/// Postgres's timestamp syntax, as pgBackRest hands it to
/// `recovery_target_time`: `2026-12-01 14:05:00[.fraction]+00[:30]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreTime {
    moment: time::OffsetDateTime,
    /// The fraction's digits as given, so the moment reads back as written
    /// (`.360870` stays six digits).
    fraction_digits: usize,
}

impl std::fmt::Display for RestoreTime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use time::macros::format_description;
        let moment = self.moment;
        let mut text = moment
            .format(format_description!(
                "[year]-[month]-[day] [hour]:[minute]:[second]"
            ))
            .map_err(|_| std::fmt::Error)?;
        if self.fraction_digits > 0 {
            let nanos = format!("{:09}", moment.nanosecond());
            text.push('.');
            text += &nanos[..self.fraction_digits.min(9)];
        }
        let (hours, minutes, _) = moment.offset().as_hms();
        let sign = if moment.offset().is_negative() {
            '-'
        } else {
            '+'
        };
        write!(f, "{text}{sign}{:02}", hours.unsigned_abs())?;
        if minutes != 0 {
            write!(f, ":{:02}", minutes.unsigned_abs())?;
        }
        Ok(())
    }
}

impl RestoreTarget {
    /// `YYYY-MM-DD HH:MM:SS[.fraction]` (a space or `T` between) and an
    /// explicit offset (`+00`, `+05:30`, `+0530`, `-05`, or `Z`), as a date
    /// and time that exist: read before anything is restored, since a
    /// moment Postgres cannot read fails only after the data directory was
    /// overwritten.
    pub fn time(text: &str) -> Result<RestoreTarget, BackupError> {
        use time::macros::format_description;
        let bad = |why: String| BackupError::BadTarget(text.to_string(), why);
        let given = text.trim();
        let given = match given.strip_suffix(['Z', 'z']) {
            Some(utc) => format!("{utc}+00"),
            None => given.to_string(),
        };
        if !given.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(bad("it does not start with a four-digit year".into()));
        }
        let moment = time::OffsetDateTime::parse(
            &given,
            format_description!(
                version = 2,
                "[year]-[month]-[day][first [ ] [T]][hour]:[minute]:[second]\
                 [optional [.[subsecond]]][offset_hour sign:mandatory]\
                 [optional [[first [:[offset_minute]] [[offset_minute]]]]]"
            ),
        )
        .map_err(|e| bad(e.to_string()))?;
        // Postgres refuses an offset beyond 15:59 ("time zone displacement
        // out of range").
        if moment.offset().whole_hours().unsigned_abs() > 15 {
            return Err(bad("its offset is beyond ±15:59".into()));
        }
        // The digits after the seconds' point, up to the offset's sign.
        let fraction_digits = given.split_once('.').map_or(0, |(_, rest)| {
            rest.chars().take_while(char::is_ascii_digit).count()
        });
        Ok(RestoreTarget::Time(RestoreTime {
            moment,
            fraction_digits,
        }))
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

/// pgBackRest for this node's cluster, run where the server's files are
/// (`postgres::CommandRunner`: this host as Postgres's account, or the
/// node's server container).
pub struct PgBackRest {
    /// Its configuration, as the pgBackRest that runs sees the path.
    conf: PathBuf,
    runner: CommandRunner,
    env: RepositoryEnv,
    superuser: SharedPassword,
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
        Ok(PgBackRest {
            conf: BackupInputs::of(config).conf,
            runner: CommandRunner::of(config, node_id)?,
            env: RepositoryEnv::of(credentials),
            superuser: SharedPassword::new(
                credentials.superuser.clone(),
                credentials.superuser_next.clone(),
            ),
        })
    }

    /// The same, logging in with the daemon's rotating superuser password.
    pub fn sharing(self, superuser: &SharedPassword) -> PgBackRest {
        PgBackRest {
            superuser: superuser.clone(),
            ..self
        }
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

    /// Runs `action`; its output, or an error with it. Dropping the
    /// future kills a local pgBackRest (keepd stopping never waits for a
    /// backup); one in a container ends with the container.
    async fn run(
        &self,
        action: &'static str,
        extra: &[&str],
        echo: bool,
    ) -> Result<String, BackupError> {
        let mut env: Vec<(&str, &SecretString)> = self.env.vars().collect();
        let superuser = self.superuser.current();
        env.push(("PGPASSWORD", &superuser));
        let out = self
            .runner
            .run(PGBACKREST, &self.args(action, extra), &env, echo)
            .await?;
        checked(action, out)
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
    /// While another backup holds the stanza's lock (the schedule's, or
    /// another `keepd backup now`), waits for it to end, telling
    /// `waiting` how long it has waited so far (at once, then each minute).
    pub async fn backup(
        &self,
        kind: BackupKind,
        waiting: impl Fn(std::time::Duration),
    ) -> Result<(), BackupError> {
        let kind = format!("--type={}", kind.name());
        let started = std::time::Instant::now();
        let mut told: Option<std::time::Instant> = None;
        loop {
            match self
                .run("backup", &[&kind, "--log-level-console=info"], true)
                .await
            {
                Err(BackupError::Failed { message, .. }) if is_lock_held(&message) => {
                    if told.is_none_or(|at| at.elapsed() >= std::time::Duration::from_secs(60)) {
                        waiting(started.elapsed());
                        told = Some(std::time::Instant::now());
                    }
                    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                }
                result => return result.map(drop),
            }
        }
    }

    /// The repository's backups and WAL archive, as pgBackRest reports
    /// them (`--output=json` for programs).
    pub async fn info(&self, json: bool) -> Result<String, BackupError> {
        match json {
            true => self.run("info", &["--output=json"], false).await,
            false => self.run("info", &[], false).await,
        }
    }

    /// Restores the data directory where `replay` has it (Postgres
    /// stopped): in place, only what differs, from the latest backup
    /// before the target; Postgres then replays the archive to it and
    /// promotes.
    pub async fn restore_into(
        &self,
        replay: &Replay,
        target: &RestoreTarget,
    ) -> Result<(), BackupError> {
        let options = target.options();
        let options: Vec<&str> = options.iter().map(String::as_str).collect();
        let mut argv = vec![PGBACKREST.to_string()];
        argv.extend(self.args("restore", &options));
        let mut env: Vec<(&str, &SecretString)> = self.env.vars().collect();
        let superuser = self.superuser.current();
        env.push(("PGPASSWORD", &superuser));
        checked("restore", replay.restore(argv, &env).await?).map(drop)
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

/// pgBackRest's answer when another of its processes holds the stanza's
/// backup lock (error 50, LockAcquireError).
fn is_lock_held(message: &str) -> bool {
    message.contains("[050]") || message.contains("is another pgBackRest process running")
}

fn checked(action: &'static str, out: RunOutput) -> Result<String, BackupError> {
    if out.success() {
        return Ok(out.stdout);
    }
    let message = [out.stderr.trim(), out.stdout.trim()]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    Err(BackupError::Failed {
        action,
        message: if message.is_empty() {
            match out.code {
                Some(code) => format!("exited with {code}"),
                None => "ended by a signal".to_string(),
            }
        } else {
            message
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pgbackrests_lock_error_is_recognised() {
        // As pgBackRest 2.x prints it when a backup holds the lock.
        let held = "ERROR: [050]: unable to acquire lock on file \
                    '/tmp/pgbackrest/keepd-backup.lock': Resource temporarily unavailable\n\
                    HINT: is another pgBackRest process running?";
        assert!(is_lock_held(held));
        assert!(!is_lock_held(
            "ERROR: [056]: unable to find primary cluster"
        ));
    }

    #[test]
    fn restore_targets_need_a_whole_moment_with_an_offset() {
        for (given, wanted) in [
            ("2026-12-01 14:05:00+00", "2026-12-01 14:05:00+00"),
            (
                "2026-12-01T14:05:00.123456Z",
                "2026-12-01 14:05:00.123456+00",
            ),
            ("2026-12-01 14:05:00-05:30", "2026-12-01 14:05:00-05:30"),
            ("2026-12-01 14:05:00+05:30", "2026-12-01 14:05:00+05:30"),
            ("2026-12-01 14:05:00+0530", "2026-12-01 14:05:00+05:30"),
            ("2026-12-01 14:05:00-05", "2026-12-01 14:05:00-05"),
            ("2026-12-01 14:05:00+01:00", "2026-12-01 14:05:00+01"),
            ("2026-12-01 14:05:00.5+00", "2026-12-01 14:05:00.5+00"),
            ("2026-12-01 14:05:00.000+00", "2026-12-01 14:05:00.000+00"),
            // As written: trailing zeros are kept.
            (
                "2026-12-06 19:46:10.360870+00",
                "2026-12-06 19:46:10.360870+00",
            ),
            ("2024-02-29 23:59:59+00", "2024-02-29 23:59:59+00"),
            (" 2026-12-01 14:05:00z ", "2026-12-01 14:05:00+00"),
        ] {
            let target = RestoreTarget::time(given).unwrap();
            assert_eq!(target.to_string(), wanted, "{given}");
            assert!(
                target.options().contains(&format!("--target={wanted}")),
                "{given}"
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
            // Digits in the right places, but no such moment.
            "2026-13-45 99:99:99+00",
            "2026-02-29 10:00:00+00",
            "2026-04-31 10:00:00+00",
            "2026-12-01 24:00:00+00",
            "2026-12-01 14:60:00+00",
            "2026-12-01 14:05:60+00",
            "2026-12-01 14:05:00+16",
            "2026-12-01 14:05:00+05:60",
            "-2026-12-01 14:05:00+00",
            "2026-12-01 14:05:00+00 UTC",
        ] {
            let error = RestoreTarget::time(bad).unwrap_err();
            assert!(error.is_configuration(), "{bad}");
            let said = error.to_string();
            assert!(
                said.contains(&format!("{bad:?}"))
                    && said.contains("`YYYY-MM-DD HH:MM:SS[.fraction]` and an offset"),
                "{said}"
            );
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
