//! Postgres's own figures for /metrics, read on a schedule (never on a
//! request or a scrape) in a transaction that runs as `pg_monitor`, the
//! least-privileged role that can read them all: keepd's tables' and
//! indexes' sizes, dead tuples and last autovacuum, sessions by state and
//! role, the oldest transaction, transaction-ID age, checkpoints and WAL,
//! the statements with the most total time (pg_stat_statements: queryid
//! and figures, never the text) and standbys' lag where there are any.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;
use tracing::warn;

use crate::metrics::{DatabaseSnapshot, Metrics};
use crate::postgres::describe_error;
use crate::postgres::tls::Endpoint;
use crate::shutdown::Shutdown;

/// How often the figures are read.
pub const EVERY: Duration = Duration::from_secs(15);
/// How many statements are exposed.
const TOP_STATEMENTS: i64 = 10;

const TABLES: &str = "SELECT schemaname || '.' || relname, \
       pg_table_size(relid)::float8, pg_indexes_size(relid)::float8, n_dead_tup::float8, \
       coalesce(extract(epoch FROM greatest(last_autovacuum, last_vacuum)), 0)::float8 \
     FROM pg_stat_user_tables WHERE schemaname IN ('keepd', 'keepd_audit') ORDER BY 1";
const SESSIONS: &str = "SELECT coalesce(state, 'background'), coalesce(usename, '-'), \
       count(*)::float8 FROM pg_stat_activity GROUP BY 1, 2 ORDER BY 1, 2";
const OLDEST: &str = "SELECT coalesce(extract(epoch FROM max(now() - xact_start)), 0)::float8 \
     FROM pg_stat_activity WHERE xact_start IS NOT NULL AND pid <> pg_backend_pid()";
const XID_AGE: &str = "SELECT max(age(datfrozenxid))::float8 FROM pg_database";
const CHECKPOINTS: &str = "SELECT checkpoints_timed::float8, checkpoints_req::float8, \
       (SELECT wal_bytes::float8 FROM pg_stat_wal) FROM pg_stat_bgwriter";
const STATEMENTS: &str = "SELECT queryid::text, sum(calls)::float8, \
       sum(total_exec_time)::float8 / 1000 FROM public.pg_stat_statements \
     WHERE queryid IS NOT NULL GROUP BY queryid ORDER BY 3 DESC LIMIT $1";
const STANDBYS: &str = "SELECT coalesce(application_name, client_addr::text, '-'), \
       coalesce(extract(epoch FROM replay_lag), 0)::float8 FROM pg_stat_replication";

pub struct DatabaseMetrics {
    pub superuser: Endpoint,
    pub metrics: Arc<Metrics>,
}

impl DatabaseMetrics {
    pub async fn run(self, mut stop: Shutdown) {
        let mut client: Option<Client> = None;
        let mut failing = false;
        loop {
            if client.as_ref().is_none_or(Client::is_closed) {
                client = self.superuser.connect().await.ok();
            }
            if let Some(c) = &mut client {
                match read(c).await {
                    Ok(snapshot) => {
                        self.metrics.set_database(&snapshot);
                        failing = false;
                    }
                    Err(e) => {
                        if !failing {
                            warn!(error = %describe_error(&e), "database metrics: cannot read them; they keep their last values");
                        }
                        failing = true;
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(EVERY) => {}
                _ = stop.requested() => return,
            }
        }
    }
}

async fn read(client: &mut Client) -> Result<DatabaseSnapshot, tokio_postgres::Error> {
    let mut tx = client.transaction().await?;
    tx.batch_execute("SET LOCAL ROLE pg_monitor").await?;
    let tables = tx
        .query(TABLES, &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    let sessions = tx
        .query(SESSIONS, &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let oldest: f64 = tx.query_one(OLDEST, &[]).await?.get(0);
    let xid_age: f64 = tx.query_one(XID_AGE, &[]).await?.get(0);
    let checkpoints = tx.query_one(CHECKPOINTS, &[]).await?;
    // pg_stat_statements is keepd's preload; an external server may lack
    // it (then no statements, and the rest of the snapshot still counts).
    let statements = {
        let optional = tx.savepoint("statements").await?;
        match optional.query(STATEMENTS, &[&TOP_STATEMENTS]).await {
            Ok(rows) => rows
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect(),
            Err(_) => Vec::new(),
        }
    };
    let standbys = tx
        .query(STANDBYS, &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    Ok(DatabaseSnapshot {
        tables,
        sessions,
        oldest_transaction_seconds: oldest,
        xid_age,
        checkpoints_timed: checkpoints.get(0),
        checkpoints_requested: checkpoints.get(1),
        wal_bytes: checkpoints.get(2),
        statements,
        standbys,
    })
}
