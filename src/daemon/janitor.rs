//! Deletes what can never be used again, so no table grows without bound:
//! Idempotency-Key records older than `api.idempotency_ttl`, and sessions
//! that expired or were revoked. It runs as the superuser, because row-level
//! security would otherwise show it one tenant at a time.

use std::time::Duration;

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
