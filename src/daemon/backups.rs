//! The backup schedule: every minute it reads what the repository holds
//! and whether Postgres archives WAL, takes the backup `backup.*` asks for
//! when one is due (full or differential; pgBackRest expires old ones by
//! `retention_full`), and publishes both in the metrics. One line per
//! event: a backup started, finished or failed, archiving failing or back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use crate::backup::{BackupKind, BackupStatus, PgBackRest};
use crate::config::{Config, Layout};
use crate::secrets::store::{CredentialStore, Credentials};

use super::DaemonError;
use crate::clock::unix_now;
use crate::metrics::Metrics;
use crate::postgres::tls::Endpoint;
use crate::shutdown::Shutdown;

const EVERY: Duration = Duration::from_secs(60);

pub struct BackupSchedule {
    pub pgbackrest: Arc<PgBackRest>,
    pub superuser: Endpoint,
    pub full_interval: Duration,
    pub diff_interval: Duration,
    pub metrics: Arc<Metrics>,
}

/// Postgres's archiver: when it last archived a segment, and whether its
/// last attempt failed.
async fn archiver(superuser: &Endpoint) -> Result<(Option<u64>, bool), tokio_postgres::Error> {
    let client = superuser.connect().await?;
    let row = client
        .query_one(
            "SELECT extract(epoch FROM last_archived_time)::int8, \
               coalesce(last_failed_time > coalesce(last_archived_time, '-infinity'), false) \
             FROM pg_stat_archiver",
            &[],
        )
        .await?;
    Ok((row.get::<_, Option<i64>>(0).map(|t| t as u64), row.get(1)))
}

impl BackupSchedule {
    /// From `backup.full_interval` and `backup.diff_interval`.
    pub fn new(
        config: &Config,
        pgbackrest: Arc<PgBackRest>,
        superuser: Endpoint,
        metrics: Arc<Metrics>,
    ) -> BackupSchedule {
        BackupSchedule {
            pgbackrest,
            superuser,
            full_interval: config.backup.full_interval.get(),
            diff_interval: config.backup.diff_interval.get(),
            metrics,
        }
    }

    pub async fn run(self, mut stop: Shutdown) {
        let mut archive_failing = false;
        loop {
            let (archived, failing) = match archiver(&self.superuser).await {
                Ok(state) => state,
                Err(e) => {
                    warn!(error = %crate::postgres::describe_error(&e), "backup: cannot read the archiver's state");
                    (None, archive_failing)
                }
            };
            if failing != archive_failing {
                if failing {
                    error!(
                        "backup: WAL archiving is failing (see the Postgres log); pg_wal keeps every segment until it succeeds, so watch the disk"
                    );
                } else {
                    info!("backup: WAL archiving works again");
                }
                archive_failing = failing;
            }
            let status = self.check().await;
            self.metrics
                .set_backup_status(status.and_then(|s| s.last_any), archived, failing);
            tokio::select! {
                _ = tokio::time::sleep(EVERY) => {}
                _ = stop.requested() => return,
            }
        }
    }

    /// Takes the backup that is due, if any; the repository's state after.
    async fn check(&self) -> Option<BackupStatus> {
        let status = self.status().await?;
        let due = status.due(
            unix_now(),
            self.full_interval.as_secs(),
            self.diff_interval.as_secs(),
        )?;
        let kind = match due {
            BackupKind::Full => "full",
            BackupKind::Differential => "differential",
        };
        info!(kind, "backup: starting");
        let started = Instant::now();
        match self.pgbackrest.backup_in_background(due).await {
            Ok(()) => info!(kind, seconds = started.elapsed().as_secs(), "backup: done"),
            Err(e) => error!(kind, error = %e, "backup: failed; retrying in a minute"),
        }
        self.status().await
    }

    async fn status(&self) -> Option<BackupStatus> {
        let info = self.pgbackrest.info(true).await;
        match info.and_then(|json| BackupStatus::from_info(&json)) {
            Ok(status) => Some(status),
            Err(e) => {
                warn!(error = %e, "backup: cannot read the repository");
                None
            }
        }
    }
}

/// pgBackRest for this node when `backup.*` is set: its stanza created in
/// the repository (every start: cheap, and it checks the repository and
/// the archive) and a segment archived through it, and for a directory repository a copy of db.enc (sealed)
/// beside the backups, for a restore onto a fresh state directory
/// (pgBackRest cannot put a file of keepd's into a bucket).
pub async fn set_up(
    config: &Config,
    layout: &Layout,
    credentials: &Credentials,
    node_id: &str,
    superuser: &Endpoint,
) -> Result<Option<Arc<PgBackRest>>, DaemonError> {
    if !config.backup.enabled() {
        return Ok(None);
    }
    let mut backups = PgBackRest::new(config, credentials, node_id)?;
    if let Some(rotating) = &superuser.shared {
        backups = backups.sharing(rotating);
    }
    let backups = Arc::new(backups);
    backups.stanza_create().await?;
    // On a first start Postgres archived before the stanza existed, and
    // failed: archive the current segment now, so the report measures
    // archiving as it is (a strict first start refused itself on the
    // earlier failure).
    match crate::backup::archive_current_wal(superuser).await {
        Ok(segment) => info!(segment, "backup: WAL archiving works"),
        Err(e) => warn!(error = %e, "backup: WAL archiving does not work yet"),
    }
    if let Some(repository) = &config.backup.repository {
        let copy = crate::repository::credentials_copy(repository);
        CredentialStore::new(layout.credentials().to_owned()).copy_sealed_to(&copy)?;
    }
    let repository = match (&config.backup.repository, &config.backup.s3) {
        (Some(dir), _) => dir.display().to_string(),
        (None, Some(s3)) => format!("s3://{}{} at {}", s3.bucket, s3.path, s3.endpoint),
        (None, None) => String::new(),
    };
    info!(repository, "backup repository ready; WAL is archived there");
    Ok(Some(backups))
}

/// At a stop, the last commits into the archive too, so a restore can
/// reach the moment of this stop.
pub async fn archive_before_stop(superuser: &Endpoint) {
    match crate::backup::archive_current_wal(superuser).await {
        Ok(segment) => info!(segment, "archived the current WAL segment before stopping"),
        Err(e) => warn!(error = %e, "could not archive the current WAL segment before stopping"),
    }
}
