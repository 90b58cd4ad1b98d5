//! Deletes what can never be used again, so nothing grows without bound:
//! Idempotency-Key records older than `api.idempotency_ttl`, sessions that
//! expired or were revoked, and Postgres's log files older than
//! `database.postgres.log_retention`. The rows are deleted as the
//! superuser, because row-level security would otherwise show it one
//! tenant at a time.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use tokio_postgres::Client;
use tracing::{info, warn};

use crate::postgres::describe_error;
use crate::postgres::tls::Endpoint;
use crate::shutdown::Shutdown;

const EXPIRED_PUSHES: &str =
    "DELETE FROM keepd.push_requests WHERE created_at <= now() - make_interval(secs => $1)";

/// A revoked session is never live again; an expired one neither.
const DEAD_SESSIONS: &str =
    "DELETE FROM keepd.sessions WHERE expires_at <= now() OR revoked_at IS NOT NULL";

pub struct Janitor {
    pub superuser: Endpoint,
    pub idempotency_ttl: Duration,
    /// The native provider's log directory and how long its files stay.
    pub postgres_logs: Option<(PathBuf, Duration)>,
}

impl Janitor {
    /// Sweeps every half TTL (at least every 10 minutes, at most every
    /// second) until `stop`.
    pub async fn run(self, mut stop: Shutdown) {
        let every =
            (self.idempotency_ttl / 2).clamp(Duration::from_secs(1), Duration::from_secs(600));
        let mut client: Option<Client> = None;
        let mut failing = false;
        loop {
            self.expire_logs();
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
    /// file of the current day is being written, so it is never one).
    fn expire_logs(&self) {
        let Some((dir, retention)) = &self.postgres_logs else {
            return;
        };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let cutoff = SystemTime::now() - *retention;
        let mut deleted = 0;
        for entry in entries.flatten() {
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|modified| modified < cutoff);
            if old && entry.path().extension().is_some_and(|e| e == "log") {
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => deleted += 1,
                    Err(e) => {
                        warn!(file = %entry.path().display(), error = %e, "janitor: cannot delete an old Postgres log")
                    }
                }
            }
        }
        if deleted > 0 {
            info!(files = deleted, retention = ?retention, "janitor: deleted old Postgres logs");
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
        if pushes + sessions > 0 {
            info!(
                idempotency_records = pushes,
                sessions, "janitor: deleted expired records"
            );
        }
        Ok(())
    }
}
