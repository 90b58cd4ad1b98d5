//! The backup schedule: every minute it reads what the repository holds
//! and whether Postgres archives WAL, takes the backup `backup.*` asks for
//! when one is due (full or differential; pgBackRest expires old ones by
//! `retention_full`), and publishes both in the metrics. One line per
//! event: a backup started, finished or failed, archiving failing or back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use crate::backup::{BackupKind, BackupStatus, PgBackRest};
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
