//! Deletes what can never be used again, so nothing grows without bound:
//! Idempotency-Key records older than `api.idempotency_ttl`, sessions that
//! expired or were revoked, devices revoked longer than
//! `api.quotas.revoked_device_retention` ago (unless backups they signed
//! are still stored: those name the device, and a client verifies them
//! with its key), failed-login counts of emails no account has once their
//! wait is over, OPAQUE logins never finished, the byte reservations of
//! pushes keepd stopped in the middle of (given back after an hour), and
//! Postgres's log files older than `database.postgres.log_retention`. The rows are deleted as the
//! superuser, because row-level security would otherwise show it one
//! tenant at a time.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstatat};
use nix::unistd::{UnlinkatFlags, unlinkat};

use tokio_postgres::Client;
use tracing::{info, warn};

use crate::config::Config;
use crate::postgres::describe_error;
use crate::postgres::tls::Endpoint;
use crate::shutdown::Shutdown;

const EXPIRED_PUSHES: &str =
    "DELETE FROM keepd.push_requests WHERE created_at <= now() - make_interval(secs => $1)";

/// A revoked session is never live again; an expired one neither.
/// (A stream of a session that expired ended at its expiry already; the
/// reason is for one the clock of its node saw differently.)
const DEAD_SESSIONS: &str = "WITH why AS (SELECT set_config('keepd.session_end', 'session_expired', true)) \
     DELETE FROM keepd.sessions USING why WHERE expires_at <= now() OR revoked_at IS NOT NULL";

/// Devices revoked more than `$1` seconds ago that no stored backup names
/// (deleting one would take its backups with it). Deleting them gives
/// their place under `api.quotas.devices` back.
const PURGED_DEVICES: &str = "DELETE FROM keepd.devices d \
     WHERE d.revoked_at <= now() - make_interval(secs => $1) \
       AND NOT EXISTS (SELECT 1 FROM keepd.backups b WHERE b.device_id = d.id)";

/// Failure counts of account keys no account has (guesses at unknown
/// emails), once no wait they impose is left.
const FORGOTTEN_ATTEMPTS: &str = "DELETE FROM keepd.login_throttle t \
     WHERE (t.last_failure IS NULL OR t.last_failure <= now() - make_interval(secs => $1)) \
       AND NOT EXISTS (SELECT 1 FROM keepd.users u WHERE u.email_hmac = t.account)";

/// Reservations no push claimed or gave back within an hour (keepd stopped
/// mid-push; migration 23): their bytes leave the usage, and a push that
/// were somehow still running could no longer claim them, so it would
/// store nothing.
const ORPHANED_RESERVATIONS: &str = "WITH gone AS ( \
       DELETE FROM keepd.push_reservations WHERE created_at <= now() - interval '1 hour' \
       RETURNING user_id, bytes), \
     given AS ( \
       UPDATE keepd.account_usage u SET storage_bytes = u.storage_bytes - g.bytes \
       FROM (SELECT user_id, sum(bytes) AS bytes FROM gone GROUP BY user_id) g \
       WHERE u.user_id = g.user_id) \
     SELECT count(*) FROM gone";

/// OPAQUE logins never finished.
const EXPIRED_LOGINS: &str = "DELETE FROM keepd.opaque_logins WHERE expires_at <= now()";

pub struct Janitor {
    pub superuser: Endpoint,
    pub idempotency_ttl: Duration,
    /// How long a revoked device is kept (`api.quotas.revoked_device_retention`).
    pub revoked_device_retention: Duration,
    /// The longest wait failed logins impose (`api.rate_limits.login_delay_max`).
    pub login_delay_max: Duration,
    /// The native provider's log directory and how long its files stay.
    pub postgres_logs: Option<(PathBuf, Duration)>,
}

impl Janitor {
    /// From `api.idempotency_ttl`, `api.quotas.revoked_device_retention`
    /// and `database.postgres.log_retention`; `postgres_logs` is the log
    /// directory of a server keepd runs on this host, if it does.
    pub fn new(config: &Config, superuser: Endpoint, postgres_logs: Option<PathBuf>) -> Janitor {
        Janitor {
            superuser,
            idempotency_ttl: config.api.idempotency_ttl.get(),
            revoked_device_retention: config.api.quotas.revoked_device_retention.get(),
            login_delay_max: config.api.rate_limits.login_delay_max.get(),
            postgres_logs: postgres_logs.map(|dir| (dir, config.database.postgres.log_retention())),
        }
    }

    /// Sweeps every half TTL (at least every 10 minutes, at most every
    /// second) until `stop`.
    pub async fn run(self, mut stop: Shutdown) {
        let every =
            (self.idempotency_ttl / 2).clamp(Duration::from_secs(1), Duration::from_secs(600));
        let mut client: Option<Client> = None;
        let mut failing = false;
        let mut logs_refused = false;
        loop {
            self.expire_logs(&mut logs_refused);
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.requested() => return,
            }
            match self.sweep(&mut client).await {
                Ok(_) if failing => {
                    failing = false;
                    info!("janitor: sweeping again");
                }
                Ok(_) => {}
                Err(e) => {
                    client = None;
                    if !failing {
                        warn!(error = %describe_error(&e), "janitor: cannot delete expired records; retrying");
                    }
                    failing = true;
                }
            }
        }
    }

    /// Deletes log files last written more than the retention ago (the
    /// file of the current day is being written, so it is never one). A
    /// log directory that is a symbolic link is refused with one warning
    /// (`refused` remembers it was given), not one per pass.
    fn expire_logs(&self, refused: &mut bool) {
        let Some((dir, retention)) = &self.postgres_logs else {
            return;
        };
        match expire_log_files(dir, *retention) {
            Ok(pass) => {
                *refused = false;
                for (file, e) in &pass.failed {
                    warn!(file = %dir.join(file).display(), error = %e, "janitor: cannot delete an old Postgres log");
                }
                if pass.deleted > 0 {
                    info!(files = pass.deleted, retention = ?retention, "janitor: deleted old Postgres logs");
                }
            }
            // Not there yet (Postgres has not logged), or gone: nothing to do.
            Err(LogDirError::Open(Errno::ENOENT)) => {}
            Err(e) => {
                if !*refused {
                    warn!(dir = %dir.display(), error = %e, "janitor: not expiring Postgres logs");
                }
                *refused = true;
            }
        }
    }

    async fn sweep(&self, client: &mut Option<Client>) -> Result<(), tokio_postgres::Error> {
        if client.is_none() {
            *client = Some(self.superuser.connect().await?);
        }
        let db = client.as_ref().expect("connected above");
        let ttl = self.idempotency_ttl.as_secs_f64();
        let pushes = db.execute(EXPIRED_PUSHES, &[&ttl]).await?;
        let sessions = db.execute(DEAD_SESSIONS, &[]).await?;
        let retention = self.revoked_device_retention.as_secs_f64();
        let devices = db.execute(PURGED_DEVICES, &[&retention]).await?;
        let attempts = db
            .execute(FORGOTTEN_ATTEMPTS, &[&self.login_delay_max.as_secs_f64()])
            .await?;
        let logins = db.execute(EXPIRED_LOGINS, &[]).await?;
        let reservations = db
            .query_one(ORPHANED_RESERVATIONS, &[])
            .await?
            .get::<_, i64>(0)
            .unsigned_abs();
        if pushes + sessions + devices + attempts + logins + reservations > 0 {
            info!(
                idempotency_records = pushes,
                sessions,
                revoked_devices = devices,
                login_attempts = attempts,
                unfinished_logins = logins,
                reservations_given_back = reservations,
                "janitor: deleted expired records"
            );
        }
        Ok(())
    }
}

/// Why the log directory was not swept.
#[derive(Debug, thiserror::Error)]
enum LogDirError {
    #[error(
        "it is a symbolic link (whoever runs Postgres could point it anywhere, and keepd \
         deletes there as its own user); make it a directory again"
    )]
    Symlink,
    #[error("it is not a directory")]
    NotDirectory,
    #[error("cannot open it: {0}")]
    Open(Errno),
}

/// What one pass over the log directory did.
#[derive(Debug, Default)]
struct LogPass {
    deleted: usize,
    /// Old log files that could not be deleted, by name.
    failed: Vec<(OsString, Errno)>,
}

/// Deletes the regular `*.log` files in `log_dir` last modified more than
/// `retention` ago. Postgres's OS user owns that directory and everything
/// in it while keepd may run as root, so no name is ever followed: its
/// parent, keepd's state directory (which Postgres cannot write), is
/// opened, the log directory relative to it with `O_NOFOLLOW` (a
/// symbolic link there is refused), and each entry is examined with
/// `fstatat(AT_SYMLINK_NOFOLLOW)` and removed with `unlinkat` relative to
/// that descriptor: only regular files, never a link's target (a link
/// entry is left alone; if a file is swapped for a link between the two
/// calls, `unlinkat` removes the link itself).
fn expire_log_files(log_dir: &Path, retention: Duration) -> Result<LogPass, LogDirError> {
    let (Some(state_dir), Some(name)) = (log_dir.parent(), log_dir.file_name()) else {
        return Err(LogDirError::NotDirectory);
    };
    let directory = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let parent =
        nix::fcntl::open(state_dir, directory, Mode::empty()).map_err(LogDirError::Open)?;
    let fd = match openat(&parent, name, directory | OFlag::O_NOFOLLOW, Mode::empty()) {
        Ok(fd) => fd,
        // O_NOFOLLOW on a link: ELOOP; O_DIRECTORY on anything else: ENOTDIR.
        Err(Errno::ELOOP | Errno::ENOTDIR) => {
            return Err(match fstatat(&parent, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(stat) if is(&stat, SFlag::S_IFLNK) => LogDirError::Symlink,
                _ => LogDirError::NotDirectory,
            });
        }
        Err(e) => return Err(LogDirError::Open(e)),
    };
    let mut dir = Dir::from_fd(fd).map_err(LogDirError::Open)?;
    // The names first, then the deletions: the directory is not changed
    // under its own listing.
    let names: Vec<OsString> = dir
        .iter()
        .flatten()
        .map(|entry| OsString::from(std::ffi::OsStr::from_bytes(entry.file_name().to_bytes())))
        .filter(|name| name.as_bytes().ends_with(b".log"))
        .collect();
    let cutoff = SystemTime::now()
        .checked_sub(retention)
        .unwrap_or(UNIX_EPOCH)
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let mut pass = LogPass::default();
    for name in names {
        let old_file = fstatat(&dir, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
            .is_ok_and(|stat| is(&stat, SFlag::S_IFREG) && stat.st_mtime < cutoff);
        if !old_file {
            continue;
        }
        match unlinkat(&dir, name.as_os_str(), UnlinkatFlags::NoRemoveDir) {
            Ok(()) => pass.deleted += 1,
            // Postgres removed or rotated it meanwhile.
            Err(Errno::ENOENT) => {}
            Err(e) => pass.failed.push((name, e)),
        }
    }
    Ok(pass)
}

fn is(stat: &FileStat, kind: SFlag) -> bool {
    SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == kind
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::unix::fs::symlink;

    const RETENTION: Duration = Duration::from_secs(7 * 86_400);

    /// A file last written 30 days ago.
    fn old_file(path: &Path) {
        std::fs::write(path, "old\n").unwrap();
        let month_ago = SystemTime::now() - Duration::from_secs(30 * 86_400);
        File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(month_ago)
            .unwrap();
    }

    #[test]
    fn old_logs_go_fresh_ones_and_other_files_stay() {
        let tmp = tempfile::tempdir().unwrap();
        let log = tmp.path().join("pgdata/log");
        std::fs::create_dir_all(&log).unwrap();
        old_file(&log.join("postgresql-Mon.log"));
        old_file(&log.join("postgresql-Mon.csv"));
        std::fs::write(log.join("postgresql-Tue.log"), "today\n").unwrap();
        std::fs::create_dir(log.join("old.log")).unwrap();
        let pass = expire_log_files(&log, RETENTION).unwrap();
        assert_eq!(pass.deleted, 1);
        assert!(pass.failed.is_empty());
        assert!(!log.join("postgresql-Mon.log").exists());
        for kept in ["postgresql-Mon.csv", "postgresql-Tue.log", "old.log"] {
            assert!(log.join(kept).exists(), "{kept} was deleted");
        }
    }

    #[test]
    fn a_symlinked_log_directory_is_refused_and_its_target_untouched() {
        let tmp = tempfile::tempdir().unwrap();
        let elsewhere = tmp.path().join("elsewhere");
        std::fs::create_dir_all(&elsewhere).unwrap();
        old_file(&elsewhere.join("precious.log"));
        std::fs::create_dir(tmp.path().join("pgdata")).unwrap();
        let log = tmp.path().join("pgdata/log");
        symlink(&elsewhere, &log).unwrap();
        let refused = expire_log_files(&log, RETENTION).unwrap_err();
        assert!(matches!(refused, LogDirError::Symlink), "{refused:?}");
        assert!(refused.to_string().contains("symbolic link"));
        assert!(elsewhere.join("precious.log").exists());

        // The janitor refuses it once (then stays quiet) and sweeps again
        // once it is a directory.
        let janitor = Janitor {
            superuser: Endpoint::new(
                tokio_postgres::Config::new(),
                crate::postgres::tls::Tls::Off,
            ),
            idempotency_ttl: Duration::from_secs(60),
            revoked_device_retention: Duration::from_secs(60),
            login_delay_max: Duration::from_secs(60),
            postgres_logs: Some((log.clone(), RETENTION)),
        };
        let mut refused = false;
        janitor.expire_logs(&mut refused);
        assert!(refused);
        janitor.expire_logs(&mut refused);
        assert!(refused);
        assert!(elsewhere.join("precious.log").exists());
        std::fs::remove_file(&log).unwrap();
        std::fs::create_dir(&log).unwrap();
        old_file(&log.join("postgresql-Fri.log"));
        janitor.expire_logs(&mut refused);
        assert!(!refused);
        assert!(!log.join("postgresql-Fri.log").exists());
    }

    #[test]
    fn a_symlinked_entry_is_never_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let elsewhere = tmp.path().join("elsewhere");
        std::fs::create_dir_all(&elsewhere).unwrap();
        let target = elsewhere.join("precious.log");
        old_file(&target);
        let log = tmp.path().join("pgdata/log");
        std::fs::create_dir_all(&log).unwrap();
        symlink(&target, log.join("postgresql-Sun.log")).unwrap();
        old_file(&log.join("postgresql-Sat.log"));
        let pass = expire_log_files(&log, RETENTION).unwrap();
        assert_eq!(pass.deleted, 1, "only the regular file");
        assert!(target.exists(), "the link's target was deleted");
        assert!(!log.join("postgresql-Sat.log").exists());
    }

    #[test]
    fn a_missing_log_directory_is_nothing_to_do() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("pgdata")).unwrap();
        let missing = expire_log_files(&tmp.path().join("pgdata/log"), RETENTION).unwrap_err();
        assert!(
            matches!(missing, LogDirError::Open(Errno::ENOENT)),
            "{missing:?}"
        );
        std::fs::write(tmp.path().join("pgdata/log"), "").unwrap();
        let file = expire_log_files(&tmp.path().join("pgdata/log"), RETENTION).unwrap_err();
        assert!(matches!(file, LogDirError::NotDirectory), "{file:?}");
    }
}
